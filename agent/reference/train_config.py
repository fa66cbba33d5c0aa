"""``TrainConfig``: every setting of ``logitwatch train``, validated, and its config files.

A config file (TOML or JSON) holds train settings by name, a ``[model]`` table of decoder
settings, or bare decoder settings; flags given on the command line win over the file.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from logitwatch.agent.reference.decoder import DecoderConfig
from logitwatch.schedules import SCHEDULE_KINDS, ScheduleConfig

__all__ = ["TrainConfig", "load_config_file"]


@dataclass
class TrainConfig:
    """Everything ``logitwatch train`` takes; ``None`` means "the preset's choice".

    >>> TrainConfig(preset="llama2", steps=100, z_loss=1e-4).decoder_config().z_loss
    0.0001
    """

    preset: str | None = "llama2"  # None: DecoderConfig's defaults plus ``model``
    full: bool = False  # the published size (far too big for a CPU; for --help and lint)
    config_file: str | None = None  # recorded only; `logitwatch train` merges the file into these
    model: dict[str, Any] = field(default_factory=dict)  # any DecoderConfig field
    # Technique switches: None keeps the preset's choice; "off" removes a soft-cap.
    qk_norm: bool | None = None
    z_loss: float | None = None
    softcap_attn: float | str | None = None
    softcap_final: float | str | None = None
    ffn: str | None = None
    dropout: float | None = None  # attention and residual dropout alike
    # Optimizer and schedule (a small byte-level model tolerates a high peak LR).
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup: int | None = None  # None: 10 % of the steps, at most 100
    min_lr_ratio: float = 0.1  # LLaMA's floor: 10 % of peak
    t0: int | None = None  # SGDR first period; None: a third of the post-warmup steps
    t_mult: int = 1
    weight_decay: float = 0.1
    adam_eps: float = 1e-8  # AdamW's epsilon: too small lets near-zero gradients take full steps
    decay_embeddings: bool = False
    clip_grad_norm: float | None = 1.0
    # The run.
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    bf16: bool = False
    fp16: bool = False  # fp16 autocast with no loss scaler: the plain fp16 failure modes
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    corpus_bytes: int = 4_000_000
    eval_batches: int = 8  # validation batches at the end; 0 = none
    # Output.
    save_every: int = 0  # 0: no checkpoints
    save_dir: str = ".logitwatch/checkpoints"
    resume: str | None = None  # a checkpoint file, or a directory: its latest
    metrics_out: str | None = None
    log_every: int = 10  # host syncs for the progress bar and metrics file
    progress: bool = True
    # Monitoring: any of server, run or spool turns the Monitor on.
    server: str | None = None
    run: str | None = None
    spool: str | None = None
    every: int = 10
    # The Monitor's readings of the weights (param.norm, update.ratio): every N steps, a
    # multiple of every; None: the Monitor's default (the first multiple at or above 10).
    param_every: int | None = None
    # What the loop does about a firing alert: checkpoint, lower-lr (x0.5), stop (see actions.py).
    on_alert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from logitwatch.agent.monitoring.actions import check_action_names

        self.on_alert = check_action_names(
            self.on_alert, monitored=bool(self.server or self.run or self.spool)
        )
        for name, low in (
            ("steps", 1),
            ("batch_size", 1),
            ("seq_len", 2),
            ("t_mult", 1),
            ("save_every", 0),
            ("log_every", 1),
            ("every", 1),
            ("eval_batches", 0),
            ("seed", 0),
            ("corpus_bytes", 10_000),
        ):
            _check_int(name, getattr(self, name), low)
        if self.param_every is not None:
            _check_int("param_every", self.param_every, 1)
            if self.param_every % self.every:
                raise ValueError(
                    f"param_every must be a multiple of every ({self.every}); "
                    f"got {self.param_every}."
                )
        for name in ("warmup", "t0"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0 if name == "warmup" else 1)
        for name in ("full", "bf16", "fp16", "progress", "decay_embeddings", "qk_norm"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "qk_norm" and value is None):
                raise ValueError(f"{name} must be true or false; got {value!r}.")
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are exclusive: choose one autocast dtype.")
        _check_number("lr", self.lr, positive=True)
        _check_number("weight_decay", self.weight_decay)
        _check_number("adam_eps", self.adam_eps, positive=True)
        _check_number("min_lr_ratio", self.min_lr_ratio, upper=1.0)
        if self.clip_grad_norm is not None:
            _check_number("clip_grad_norm", self.clip_grad_norm, positive=True)
        if self.dropout is not None:
            _check_number("dropout", self.dropout, upper=0.99)
        for name in ("softcap_attn", "softcap_final"):
            if getattr(self, name) not in (None, "off"):
                _check_number(name, getattr(self, name), positive=True, hint=' or "off"')
        if self.schedule not in SCHEDULE_KINDS:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULE_KINDS)}; got {self.schedule!r}."
            )
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda", "mps")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}.")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a table of decoder settings; got {self.model!r}.")
        self.decoder_config()  # a bad preset or decoder value fails here, before any work
        self.schedule_config()

    def decoder_config(self) -> DecoderConfig:
        from logitwatch.agent.reference.presets import get_preset

        over = dict(self.model)
        for name in ("qk_norm", "z_loss", "ffn", "softcap_attn", "softcap_final"):
            value = getattr(self, name)
            if value is not None:
                over[name] = None if value == "off" else value
        if self.dropout is not None:
            over["dropout_attn"] = over["dropout_resid"] = self.dropout
        if self.preset is None:
            base = DecoderConfig.from_dict(over)
        else:
            base = get_preset(self.preset, full=self.full, **over)
        if base.max_seq_len < self.seq_len:  # only sizes RoPE tables / learned positions
            base = DecoderConfig.from_dict({**base.to_dict(), "max_seq_len": self.seq_len})
        if base.vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256 for byte tokens; got {base.vocab_size}.")
        return base

    def schedule_config(self) -> ScheduleConfig:
        warmup = min(100, self.steps // 10) if self.warmup is None else self.warmup
        t0 = max(1, (self.steps - warmup) // 3) if self.t0 is None else self.t0
        return ScheduleConfig(
            self.schedule, self.lr, warmup, self.steps, self.min_lr_ratio, t0, self.t_mult
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Train fields by name, a ``model`` table, and bare DecoderConfig fields (into ``model``)."""
        own = {f.name for f in fields(cls)}
        decoder = {f.name for f in fields(DecoderConfig)}
        kwargs: dict[str, Any] = {"model": dict(data.get("model") or {})}
        for key, value in data.items():
            if key == "model":
                continue
            if key in own:
                kwargs[key] = value
            elif key in decoder:
                kwargs["model"][key] = value
            else:
                raise ValueError(
                    f"unknown config key {key!r}: neither a train nor a decoder setting."
                )
        return cls(**kwargs)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")


def _check_number(
    name: str, value: Any, positive: bool = False, upper: float | None = None, hint: str = ""
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0) or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ("> 0" if positive else ">= 0")
        raise ValueError(f"{name} must be a number {bound}{hint}; got {value!r}.")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a .toml or .json file, as a dict (``TrainConfig.from_dict`` checks them)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config: no file at {str(p)!r}.")
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text())
        else:
            data = tomllib.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"config: {p.name} is not valid {p.suffix[1:].upper() or 'TOML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"config: {p.name} must hold a table of settings, not {type(data).__name__}."
        )
    return data
