"""The instability zoo's configurations: stable controls and failing cases, each with its cause.

Every case is a set of ``TrainConfig`` overrides on a small byte-level decoder, plus the zoo-only
knobs that a config cannot express (corrupted batches, a resume with the LR ten times too high).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CASES",
    "CAUSES",
    "HEALTHY",
    "HEALTHY_SCALE",
    "KINDS",
    "REDUCED",
    "TRAINERS",
    "ZooCase",
    "ZooScale",
    "cases_named",
    "healthy_cases",
]

#: The rules that name each cause (a case passes when one of these fires before anything else).
CAUSES: dict[str, tuple[str, ...]] = {
    "attention": (
        "attn-logit-high",
        "attn-logit-critical",
        "attn-logit-growth",
        "attn-logit-runaway",
        "attn-entropy-floor",
        "attn-entropy-drop",
    ),
    "output-logits": ("logz-high", "logz-drift", "output-logit-near-cap", "output-logit-mean"),
    "lr": ("lr-off-schedule", "update-ratio-jump"),
    "data": ("loss-spike", "grad-norm-spike", "grad-spike-then-loss-spike"),
    "nonfinite": ("nonfinite", "nonfinite-count"),
}

KINDS = ("control", "failing", "spike")
#: The loops a case can run under: the reference trainer, tiny Hugging Face models under
#: ``transformers.Trainer``, and a user's own decoder under ``attach`` (agent/zoo/trainers.py).
TRAINERS = ("reference", "hf-gpt2", "hf-llama", "hf-qwen2", "attach")
STABLE = dict(qk_norm=True, z_loss=1e-4, weight_decay=0.1, schedule="cosine", lr=3e-3)


@dataclass(frozen=True)
class ZooCase:
    """One configuration of the zoo.

    >>> cases_named(["noqk-high-lr"])[0].cause
    'attention'
    """

    name: str
    kind: str  # control (no warning allowed) | failing (warns before it diverges) | spike
    cause: str | None  # key of CAUSES; None for controls
    doc: str
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    corrupt_at: tuple[float, ...] = ()  # fractions of the run: those batches are random bytes
    resume_at: float | None = None  # fraction of the run: checkpoint there, then resume ...
    resume_lr_scale: float = 1.0  # ... with the optimizer's LR times this (the schedule unchanged)
    trainer: str = "reference"  # one of TRAINERS; only the reference trainer reads overrides

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {', '.join(TRAINERS)}; got {self.trainer!r}.")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}.")
        if (self.cause is None) != (self.kind == "control") or (
            self.cause is not None and self.cause not in CAUSES
        ):
            raise ValueError(
                f"case {self.name}: cause {self.cause!r} does not fit kind {self.kind}."
            )


@dataclass(frozen=True)
class ZooScale:
    """How big and how long: the reduced zoo (tests) and the full zoo (benchmark)."""

    steps: int = 240
    batch_size: int = 8
    seq_len: int = 64
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    every: int = 5  # the Monitor's reporting interval
    seeds: int = 3
    corpus_bytes: int = 600_000

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "n_layers", "d_model", "every", "seeds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
        if self.steps < 10 * self.every:
            raise ValueError(
                f"steps must be at least 10 x every ({10 * self.every}); got {self.steps}."
            )

    def train_overrides(self) -> dict[str, Any]:
        return {
            "preset": None,
            "model": {"n_layers": self.n_layers, "d_model": self.d_model, "n_heads": self.n_heads},
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "every": self.every,
            "corpus_bytes": self.corpus_bytes,
        }


REDUCED = ZooScale(steps=150, batch_size=8, seq_len=64, every=5, seeds=1, corpus_bytes=300_000)
#: The healthy matrix's scale: the presets are 4-layer models, some wide (t5: d_ff 8192).
HEALTHY_SCALE = ZooScale(steps=150, seeds=3)

CASES: tuple[ZooCase, ...] = (
    ZooCase(
        "stable",
        "control",
        None,
        "QK-norm, z-loss 1e-4, weight decay 0.1, warmup + cosine at LR 3e-3",
        dict(STABLE),
    ),
    ZooCase(
        "stable-sgdr",
        "control",
        None,
        "the stable recipe with SGDR warm restarts (three periods)",
        {**STABLE, "schedule": "sgdr"},
    ),
    ZooCase(
        "lowlr-noqk",
        "control",
        None,
        "no QK-norm, but a low LR (1e-3): the logits never run away",
        {**STABLE, "qk_norm": False, "lr": 1e-3},
    ),
    ZooCase(
        "noqk-high-lr",
        "failing",
        "attention",
        "no QK-norm at LR 3e-2: attention logits grow, entropy collapses, the loss stalls",
        {**STABLE, "qk_norm": False, "lr": 3e-2},
    ),
    ZooCase(
        "noqk-very-high-lr",
        "failing",
        "attention",
        "no QK-norm at LR 1e-1",
        {**STABLE, "qk_norm": False, "lr": 1e-1},
    ),
    ZooCase(
        "noqk-softcap50",
        "failing",
        "attention",
        "no QK-norm behind an attention soft-cap of 50 at LR 3e-2: the cap saturates",
        {**STABLE, "qk_norm": False, "softcap_attn": 50.0, "lr": 3e-2},
    ),
    ZooCase(
        "no-zloss-no-wd",
        "failing",
        "output-logits",
        "QK-norm, but no z-loss and no weight decay at LR 3e-2: log Z drifts",
        {**STABLE, "z_loss": 0.0, "weight_decay": 0.0, "lr": 3e-2},
    ),
    ZooCase(
        "bf16-high-lr",
        "failing",
        "attention",
        "bf16 autocast, no QK-norm, LR 3e-2",
        {**STABLE, "qk_norm": False, "bf16": True, "lr": 3e-2},
    ),
    ZooCase(
        "fp16-noqk",
        "failing",
        "attention",
        "fp16 autocast with no loss scaler, attention computed in fp16 (eager), no QK-norm, "
        "LR 5e-2: the attention logits grow for ~100 steps, then the loss goes NaN",
        {**STABLE, "qk_norm": False, "fp16": True, "lr": 5e-2, "model": {"attn_impl": "eager"}},
    ),
    ZooCase(
        "resume-lr-x10",
        "failing",
        "lr",
        "the stable recipe resumed at 40 % with the optimizer's LR ten times the schedule",
        dict(STABLE),
        resume_at=0.4,
        resume_lr_scale=10.0,
    ),
    ZooCase(
        "corrupted-batches",
        "spike",
        "data",
        "the stable recipe with two batches of random bytes: a loss spike that recovers",
        dict(STABLE),
        corrupt_at=(0.5, 0.7),
    ),
)


PRESET_NAMES = ("gpt3", "t5", "t5-v1.1", "lamda", "palm", "llama2")

#: The healthy matrix beyond CASES' controls: every preset at its CPU size with the stable
#: recipe, tiny Hugging Face models under their Trainer, and a user decoder under ``attach``.
#: ``logitwatch zoo --healthy`` runs these and every control of CASES: no alert is allowed.
HEALTHY: tuple[ZooCase, ...] = (
    *(
        ZooCase(
            f"preset-{name}",
            "control",
            None,
            f"the {name} preset at its CPU size with the stable recipe",
            {**STABLE, "preset": name},
        )
        for name in PRESET_NAMES
    ),
    *(
        ZooCase(
            f"hf-{name}",
            "control",
            None,
            f"a tiny Hugging Face {name} built from its config under transformers.Trainer and "
            "LogitwatchCallback: LR 1e-3, 10 % warmup, cosine, weight decay 0.1, clipping 1.0",
            trainer=f"hf-{name}",
        )
        for name in ("gpt2", "llama", "qwen2")
    ),
    ZooCase(
        "attach-user-decoder",
        "control",
        None,
        "a user's own decoder (fused qkv, inline attention) in a plain loop, probes installed by "
        "attach: LR 1e-3, 10 % warmup, cosine, weight decay 0.1, clipping 1.0",
        trainer="attach",
    ),
)


def healthy_cases() -> list[ZooCase]:
    """The healthy matrix: every control of CASES, then HEALTHY."""
    return [c for c in CASES if c.kind == "control"] + list(HEALTHY)


def cases_named(names: list[str] | None) -> list[ZooCase]:
    """The cases by name, in catalogue order (all of CASES when ``names`` is empty)."""
    if not names:
        return list(CASES)
    known = {c.name: c for c in (*CASES, *HEALTHY)}
    for n in names:
        if n not in known:
            raise ValueError(f"cases: unknown zoo case {n!r}; known: {', '.join(known)}.")
    return [c for c in known.values() if c.name in names]
