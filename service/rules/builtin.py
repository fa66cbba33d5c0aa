"""Built-in stability rules with defaults from the literature; each function names its source.

A user rule with the same name replaces a built-in one (``enabled: false`` switches it off).
"""

from __future__ import annotations

from logitwatch.service.rules.model import Rule, parse_rules

__all__ = ["builtin_rules"]

HINT_QK = "enable QK-norm or soft-cap attention logits at 50"
HINT_RESTART = "restart from a checkpoint and skip the offending batches, as PaLM did"

# Hysteresis (one alert an episode): a level stays firing until the value is 10 % back on the
# safe side of its threshold and has stayed there 20 steps; a growth or drop until it has been
# clear for a whole window. Spikes and jumps are events: each one is its own alert.
LEVEL = {"hold_steps": 20, "resolve_margin": 0.1}
TREND = {"hold_steps": 50, "resolve_margin": 0.1}
EVENT = {"hold_steps": 10}


def nonfinite() -> list[dict]:
    """Non-finite loss, logits or gradients: critical at once.

    Source: PaLM (Chowdhery et al. 2022, §5.1) — once a NaN appears, training is lost
    from that step; the cure is a restart from an earlier checkpoint.
    """
    return [
        {
            "name": "nonfinite",
            "metric": ["loss", "loss.*", "grad.norm", "logits.*", "logz.*"],
            "condition": {"kind": "nonfinite"},
            "severity": "critical",
            "hint": f"{HINT_RESTART}; then lower the LR",
            "source": "PaLM (Chowdhery et al. 2022) §5.1",
            **LEVEL,
        },
        {
            "name": "nonfinite-count",
            "metric": "nonfinite.count",
            "condition": {"kind": "threshold", "op": ">", "value": 0},
            "severity": "critical",
            "hint": f"{HINT_RESTART}; then lower the LR",
            "source": "PaLM (Chowdhery et al. 2022) §5.1",
            **LEVEL,
        },
    ]


def attention_logits() -> list[dict]:
    """Attention logit max per layer/head (the probes report max |q·k/√d|): level and growth.

    Sources: Kimi K2 (Moonshot AI 2025) clips q·k at τ = 100 (QK-Clip) — warning above 100;
    Wortsman et al. 2023 "Small-scale proxies for large-scale Transformer training
    instabilities": every run whose max attention logit passed 1e4 diverged — critical above
    1e3. Growth ×2 within 50 steps after warmup is the runaway those papers describe; it counts
    from a baseline of at least 20, so it fires only at 40 and above: after warmup healthy runs
    still grow from ~1 to 10-22 (zoo controls, the demo), which is training, not a runaway.
    Runs without warmup (tiny Hugging Face models at LR 1e-2 reach 47) are judged once the
    value has settled (model.Growth).

    The runaway rule watches from the first step, warmup included, because the runaway starts
    there: in the zoo's failing runs the max logit passes 50 by step 15-25 and the run diverges
    by step 48-132, while 64 healthy runs (six presets, SGDR, Hugging Face GPT-2, Llama and
    Qwen2, a user decoder) stay under 13, and healthy runs without QK-norm or warmup under 50.
    It needs |x| >= 50 (a baseline floor of 25) and a doubling within 50 steps, so a model that
    sits at a high but steady logit is not judged by level alone. 50 is where Gemma 2 soft-caps.
    """
    return [
        {
            "name": "attn-logit-high",
            "metric": "attn.logit_max",
            "condition": {"kind": "threshold", "op": ">", "value": 100, "abs": True},
            "for_steps": 2,
            "severity": "warning",
            "hint": HINT_QK,
            "source": "Kimi K2 QK-Clip tau = 100",
            **LEVEL,
        },
        {
            "name": "attn-logit-critical",
            "metric": "attn.logit_max",
            "condition": {"kind": "threshold", "op": ">", "value": 1000, "abs": True},
            "severity": "critical",
            "hint": f"{HINT_QK}; {HINT_RESTART}",
            "source": "Wortsman et al. 2023: max attention logit > 1e4 always diverged",
            **LEVEL,
        },
        {
            "name": "attn-logit-growth",
            "metric": "attn.logit_max",
            "condition": {"kind": "growth", "ratio": 2.0, "over_steps": 50, "min_value": 20},
            "for_steps": 2,
            "skip_warmup": True,
            "mute_after_restart": 50,
            "severity": "warning",
            "hint": f"{HINT_QK}; or lower the LR",
            "source": "Wortsman et al. 2023 (attention logit growth)",
            **TREND,
        },
        {
            "name": "attn-logit-runaway",
            "metric": "attn.logit_max",
            "condition": {
                "kind": "growth",
                "ratio": 2.0,
                "over_steps": 50,
                "min_value": 25,
                "settle": False,
            },
            "mute_after_restart": 50,
            "severity": "warning",
            "hint": f"{HINT_QK}; or lower the LR",
            "source": "Wortsman et al. 2023 (attention logit growth); Gemma 2 soft-cap 50",
            **TREND,
        },
    ]


def attention_entropy() -> list[dict]:
    """Attention entropy collapse per layer, as a fraction of log(keys): a floor and a sharp drop.

    Source: Zhai et al. 2023 "Stabilizing Transformer Training by Preventing Attention Entropy
    Collapse" — pathologically low attention entropy precedes divergence; it follows the growth
    of attention logits that QK-norm bounds.
    """
    return [
        {
            "name": "attn-entropy-floor",
            "metric": "attn.entropy_frac",
            "condition": {"kind": "threshold", "op": "<", "value": 0.1},
            "for_steps": 3,
            "skip_warmup": True,
            "severity": "warning",
            "hint": f"{HINT_QK}; or lower the LR",
            "source": "Zhai et al. 2023 (entropy collapse)",
            **LEVEL,
        },
        {
            "name": "attn-entropy-drop",
            "metric": "attn.entropy_frac",
            # from >= 0.4 only: a healthy tiny model at LR 1e-2 went 0.36 -> 0.18 and trained on;
            # 3 points: reported every step, a tiny GPT-2's entropy (dropout 0.1) swings 0.2-0.6
            "condition": {"kind": "growth", "ratio": 0.5, "over_steps": 50, "min_value": 0.4},
            "for_steps": 3,
            "skip_warmup": True,
            "mute_after_restart": 50,
            "severity": "warning",
            "hint": f"{HINT_QK}; or lower the LR",
            "source": "Zhai et al. 2023 (entropy collapse)",
            **TREND,
        },
    ]


def output_logits() -> list[dict]:
    """Log Z drift and output-logit growth: the output-logit divergence that z-loss cures.

    Sources: PaLM (Chowdhery et al. 2022) adds z-loss 1e-4·log²Z to keep log Z near 0;
    Wortsman et al. 2023 §3.2 show output logits diverging (log Z far from 0) without it.
    ln(vocab) is ~10-12 for common vocabularies at initialisation, so |log Z| > 30 is e^18 off.
    Gemma 2 soft-caps final logits at 30: logits pinned near the cap have lost their gradient.
    """
    z = "add z-loss 1e-4 (PaLM) to keep log Z near 0"
    return [
        {
            "name": "logz-high",
            "metric": "logz.mean",
            "condition": {"kind": "threshold", "op": ">", "value": 30, "abs": True},
            "for_steps": 3,
            "severity": "warning",
            "hint": z,
            "source": "PaLM z-loss; Wortsman et al. 2023 §3.2",
            **LEVEL,
        },
        {
            "name": "logz-drift",
            "metric": "logz.mean",
            "condition": {
                "kind": "slope",
                "above": 0.02,
                "window_steps": 200,
                "min_points": 10,
                "min_value": 15,
                "abs": True,
            },
            "for_steps": 3,
            "skip_warmup": True,
            "severity": "warning",
            "hint": z,
            "source": "PaLM z-loss; Wortsman et al. 2023 §3.2",
            **TREND,
        },
        {
            "name": "output-logit-near-cap",
            "metric": "logits.max_abs",
            "condition": {
                "kind": "threshold",
                "op": ">",
                "value": 0.9,
                "of_config": "softcap_final",
            },
            "for_steps": 3,
            "severity": "warning",
            "hint": f"{z}; enable weight decay 0.1",
            "source": "Gemma 2 final soft-cap (30); PaLM z-loss",
            **LEVEL,
        },
        {
            "name": "output-logit-mean",
            "metric": "logits.mean",
            "condition": {"kind": "threshold", "op": ">", "value": 20, "abs": True},
            "for_steps": 3,
            "severity": "warning",
            "hint": f"{z}; enable weight decay 0.1",
            "source": "Wortsman et al. 2023 §3.2 (output logit divergence)",
            **LEVEL,
        },
    ]


def spikes() -> list[dict]:
    """Loss and gradient-norm spikes: above centre + 6σ of a rolling window, robust to heavy tails.

    Source: OLMo 2 (Team OLMo 2024) counts a spike as a value more than 6-7 σ above a rolling
    window; here the centre is the median of the last 20 points and σ the 1.4826·MAD of first
    differences over the last 200 (/√2): the noise around the trend, not the trend, and earlier
    spikes do not widen it. A grad-norm spike alone is info (clipping absorbs it); one before a
    loss spike is the instability signature (warning); both at the same step is more likely one
    bad batch. SGDR restarts mute these rules for 50 steps. A loss spike must also be 15 %
    above the median: a tiny model's loss reported every step on 512-token batches (Hugging
    Face, LR 1e-3 with warmup, healthy) passed 6σ by 5-12 % seven times in 200 steps; a batch
    of random bytes doubles it.
    """
    spike = {"kind": "mad", "window": 200, "sigmas": 6, "min_points": 10}
    common = {"skip_warmup": True, "mute_after_restart": 50, "severity": "warning", **EVENT}
    return [
        {
            "name": "loss-spike",
            "metric": "loss",
            "condition": spike | {"min_rel": 0.15},
            "hint": f"if the loss does not recover: {HINT_RESTART}; lower the LR",
            "source": "OLMo 2 (Team OLMo 2024) spike score",
            **common,
        },
        {
            "name": "grad-norm-spike",
            "metric": "grad.norm",
            "labels": {"layer": ""},
            # a 2x wiggle is ordinary at small batch sizes; a bad batch gives 3-10x (zoo)
            "condition": spike | {"min_rel": 1.5, "min_points": 12},
            "hint": "lower the LR or lengthen warmup; clip gradients at 1.0",
            "source": "OLMo 2 (Team OLMo 2024) spike score",
            **common,
            # Alone, a clipped grad spike that the loss never feels is worth a record, not a
            # page (the zoo's stable controls have them); followed by a loss spike it warns.
            "severity": "info",
        },
        {
            "name": "grad-spike-then-loss-spike",
            "metric": "loss",
            "condition": spike | {"min_rel": 0.15},
            "preceded_by": {"rule": "grad-norm-spike", "within_steps": 20},
            "hint": f"lower the LR; {HINT_RESTART}",
            "source": "OLMo 2 (Team OLMo 2024); PaLM §5.1",
            **common,
        },
    ]


def schedule_and_updates() -> list[dict]:
    """LR off its declared schedule, and update-ratio jumps.

    Sources: warmup + cosine to 10 % (LLaMA, Touvron et al. 2023) and SGDR warm restarts
    (Loshchilov & Hutter 2017) give the LR of every step; a jump of ‖Δw‖/‖w‖ to ×5 its recent
    median is the signature of a resume with the wrong LR (the lecture's "LR too high").
    """
    return [
        {
            "name": "lr-off-schedule",
            "metric": "lr",
            "condition": {"kind": "schedule", "tolerance": 0.1},
            "for_steps": 3,
            "severity": "warning",
            "hint": "the LR is not the declared schedule: check the scheduler state after a resume; lower the LR to the schedule",
            "source": "Loshchilov & Hutter 2017 (SGDR); LLaMA cosine to 10 %",
            **LEVEL,
        },
        {
            "name": "update-ratio-jump",
            "metric": "update.ratio",
            "labels": {"layer": ""},
            # one point: after a wrong-LR resume Adam's update ratio decays back within steps
            "condition": {"kind": "jump", "ratio": 5, "window": 20, "min_points": 5},
            "skip_warmup": True,
            "mute_after_restart": 50,
            "severity": "warning",
            "hint": "updates jumped: lower the LR (a resume with the wrong LR?); lengthen warmup after a resume",
            "source": "lecture: LR too high; Loshchilov & Hutter 2017 for expected restarts",
            **EVENT,
        },
    ]


def silence() -> list[dict]:
    """A run that stops reporting for 10 minutes (checked periodically).

    Source: operational practice (Prometheus ``absent()`` alerts); a hung or crashed job
    costs GPU hours until someone looks.
    """
    return [
        {
            "name": "run-silent",
            "metric": "*",
            "condition": {"kind": "absent", "seconds": 600},
            "severity": "warning",
            "hint": "the run stopped reporting: check the training process (crashed, hung, or cut off)",
            "source": "Prometheus absent() practice",
        }
    ]


def builtin_rules() -> list[Rule]:
    """Every built-in rule, validated like user rules."""
    data = []
    for group in (
        nonfinite,
        attention_logits,
        attention_entropy,
        output_logits,
        spikes,
        schedule_and_updates,
        silence,
    ):
        data += group()
    return parse_rules(data)
