"""The hyperparameter lint: a decoder config and training settings checked against the
lecture's consensus, each finding with its severity, the reason the rule exists and a source.

>>> [f.rule for f in lint(get_preset("t5", full=True), TrainSettings(warmup=1000, weight_decay=0.1))]
['ffn_ratio', 'head_ratio', 'aspect', 'softmax']
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from logitwatch.agent.reference.decoder import GLU_KINDS, DecoderConfig
from logitwatch.agent.reference.presets import get_preset

__all__ = ["Finding", "TrainSettings", "lint", "load_lint_config"]

SEVERITIES = ("info", "warning")


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # "info": off the consensus but within its range; "warning": far off or missing
    message: str  # what this config does, with its numbers
    reason: str  # why the rule exists
    source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainSettings:
    """The training settings the lint checks; ``None`` means "not given", which is reported."""

    warmup: int | None = None  # warmup steps
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        w = self.warmup
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ValueError(f"warmup must be an integer >= 0 (steps); got {w!r}.")
        d = self.weight_decay
        ok = isinstance(d, int | float) and not isinstance(d, bool) and math.isfinite(d) and d >= 0
        if d is not None and not ok:
            raise ValueError(f"weight_decay must be a number >= 0; got {d!r}.")


def _band(value: float, target_low: float, target_high: float, tolerance: float) -> str | None:
    """None inside [low, high]; "info" within ``tolerance``x of it; "warning" beyond."""
    if target_low <= value <= target_high:
        return None
    near = target_low / tolerance <= value <= target_high * tolerance
    return "info" if near else "warning"


def _shape_findings(c: DecoderConfig) -> list[Finding]:
    out = []
    glu = c.ffn in GLU_KINDS
    ff, target = c.d_ff / c.d_model, (8 / 3 if glu else 4.0)
    # ±10 % counts as on target: 8/3 rounded to a multiple of 64, LLaMA's 2.69, T5 v1.1's 2.5.
    sev = _band(ff, target * 0.9, target * 1.1, tolerance=2.0)
    if sev:
        out.append(Finding(
            "ffn_ratio", sev,
            f"d_ff/d_model = {ff:.2f} with {c.ffn}; the consensus is {target:.2f}"
            f"{' (8/3 for GLU kinds)' if glu else ''}.",
            "d_ff = 4·d_model is the near-universal choice; GLU kinds use 8/3 so that their "
            "three matrices hold what two hold at 4x. Loss is flat over a wide band around it "
            "(Kaplan et al.), so large departures, like T5 11B's 64, buy little and cost memory.",
            "CS336 lecture 3 (FFN ratio); Shazeer 2020, GLU Variants Improve Transformer; "
            "Kaplan et al. 2020, Scaling Laws, fig. 5",
        ))  # fmt: skip
    heads = c.n_heads * c.head_dim / c.d_model
    sev = _band(heads, 1.0, 1.0, tolerance=2.0)
    if sev:
        out.append(Finding(
            "head_ratio", sev,
            f"n_heads·head_dim/d_model = {c.n_heads}·{c.head_dim}/{c.d_model} = {heads:.2f}; "
            "the consensus is 1.",
            "Most models split d_model evenly over the heads, so attention costs what a dense "
            "layer of width d_model costs; T5 11B (16) and LaMDA (2) are the lecture's "
            "outliers.",
            "CS336 lecture 3 (head-dimension table); Vaswani et al. 2017",
        ))  # fmt: skip
    aspect = c.d_model / c.n_layers
    sev = _band(aspect, 100, 200, tolerance=4.0)  # Kaplan: within ~4x the loss barely moves
    if sev:
        out.append(Finding(
            "aspect", sev,
            f"d_model/n_layers = {c.d_model}/{c.n_layers} = {aspect:.0f}; most models sit at "
            "100-200.",
            "Loss depends weakly on the aspect ratio over a wide range, with an optimum near "
            "d_model/n_layers ≈ 100-200; deeper stacks parallelise worse (layers run in "
            "sequence), wider ones waste compute. Small test models are naturally off.",
            "CS336 lecture 3 (aspect ratio); Kaplan et al. 2020, fig. 5",
        ))  # fmt: skip
    return out


def _training_findings(c: DecoderConfig, t: TrainSettings) -> list[Finding]:
    out = []
    if not t.warmup:
        out.append(Finding(
            "warmup", "info" if t.warmup is None else "warning",
            "warmup not given (--warmup N)." if t.warmup is None else "no LR warmup (0 steps).",
            "Adam's second-moment estimates are poor in the first steps and the early "
            "updates are large; a linear warmup keeps them from blowing up the loss or the "
            "attention logits. GPT-3 and LLaMA 2 warm up linearly.",
            "CS336 lecture 3.2 (LR schedule); Liu et al. 2020, On the Variance of the Adaptive "
            "Learning Rate; Touvron et al. 2023 (2000 warmup steps)",
        ))  # fmt: skip
    if not t.weight_decay:
        out.append(Finding(
            "weight_decay", "info" if t.weight_decay is None else "warning",
            "weight decay not given (--weight-decay X)."
            if t.weight_decay is None
            else "weight decay is off.",
            "Pre-training sees far more tokens than parameters, so decay is not there against "
            "overfitting: it interacts with the cosine schedule and gives a lower loss at the "
            "end of training. AdamW with 0.1 is the common choice.",
            "CS336 lecture 3.2 (regularization); Andriushchenko et al. 2023, arXiv:2310.04415",
        ))  # fmt: skip
    attn_guard = c.qk_norm or c.softcap_attn
    out_guard = c.z_loss > 0 or c.softcap_final
    if not (attn_guard or out_guard):
        sev, msg = "warning", "no QK-norm, z-loss or soft-cap: neither softmax is guarded."
    elif not attn_guard:
        sev, msg = "info", "attention logits unguarded (no QK-norm, no softcap_attn)."
    elif not out_guard:
        sev, msg = "info", "output logits unguarded (no z-loss, no softcap_final)."
    else:
        return out
    out.append(Finding(
        "softmax", sev, msg,
        "Softmax overflows and saturates when its inputs grow: attention logits grow "
        "with ‖q‖‖k‖ and the output log Z drifts. QK-norm or soft-capping bounds the "
        "attention logits; z-loss (1e-4) or a final soft-cap keeps log Z near 0.",
        "CS336 lecture 3.2 (stable training); Chowdhery et al. 2022 (PaLM z-loss); "
        "Dehghani et al. 2023 (QK-norm); Gemma Team 2024 (soft-capping)",
    ))  # fmt: skip
    return out


def lint(config: DecoderConfig, train: TrainSettings | None = None) -> list[Finding]:
    """Every finding for this config, shape rules first, then training settings."""
    return _shape_findings(config) + _training_findings(config, train or TrainSettings())


def _trainer_keys() -> set[str]:
    """Settings of `logitwatch train`'s config files, accepted (and not checked) here."""
    try:
        from logitwatch.agent.reference.train_config import TrainConfig
    except ImportError:
        return set()
    return {f.name for f in fields(TrainConfig)}


def load_lint_config(path: str | Path) -> tuple[DecoderConfig, TrainSettings, str]:
    """A TOML/JSON file: optional ``preset``/``full``, decoder settings bare or under
    ``[model]``, and ``warmup``/``weight_decay`` bare or under ``[train]``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config: no file at {str(p)!r}.")
    try:
        data = json.loads(p.read_text()) if p.suffix == ".json" else tomllib.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSON and TOML errors are ValueErrors
        raise ValueError(
            f"config: {p.name} is not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"config: {p.name} must hold a table of settings.")
    decoder_keys = {f.name for f in fields(DecoderConfig)}
    train_keys = {f.name for f in fields(TrainSettings)}
    tolerated = _trainer_keys()
    model, train = {}, {}
    for section in ("model", "train"):
        if not isinstance(data.get(section, {}), dict):
            raise ValueError(f"config: [{section}] must be a table of settings.")
    for key, value in data.get("train", {}).items():
        if key in train_keys:
            train[key] = value
        elif key not in tolerated:
            raise ValueError(f"unknown config key 'train.{key}'; lint reads warmup, weight_decay.")
    model.update(data.get("model", {}))  # DecoderConfig.from_dict names a bad key
    for key, value in data.items():
        if key in ("model", "train", "preset", "full"):
            continue
        if key in decoder_keys:
            model[key] = value
        elif key in train_keys:
            train.setdefault(key, value)
        elif key not in tolerated:
            raise ValueError(
                f"unknown config key {key!r}; allowed: preset, full, [model], [train], "
                f"{', '.join(sorted(decoder_keys | train_keys))}."
            )
    preset = data.get("preset")
    full = data.get("full", False)
    if not isinstance(full, bool):
        raise ValueError(f"full must be true or false; got {full!r}.")
    if preset is None:
        config = DecoderConfig.from_dict(model)
    else:
        config = get_preset(str(preset), full=full, **model)
    label = f"{p.name}" + (f" (preset {preset}{', full' if full else ''})" if preset else "")
    return config, TrainSettings(**train), label
