"""Learning-rate schedules as closed-form formulas, shared by the trainer and the service.

No torch here: the agent wraps these in ``LRScheduler`` subclasses, and the service's rule engine
imports them to compute the LR a run should have at each step ("LR off its declared schedule").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["SCHEDULE_KINDS", "ScheduleConfig", "lr_at", "restart_steps"]

SCHEDULE_KINDS = ("cosine", "sgdr", "constant")


@dataclass(frozen=True)
class ScheduleConfig:
    """The LR of each optimizer step. ``step`` counts from 0: step 0 is the first update.

    >>> cfg = ScheduleConfig(kind="cosine", peak_lr=1e-3, warmup_steps=10, total_steps=100)
    >>> lr_at(cfg, 9), lr_at(cfg, 10), round(lr_at(cfg, 100), 6)
    (0.001, 0.001, 0.0001)
    """

    kind: str = "cosine"
    peak_lr: float = 3e-4
    #: Linear warmup from peak/warmup to peak over this many steps; Adam's second-moment
    #: estimates are noisy at first, and a full-size step then is what blows runs up.
    warmup_steps: int = 0
    #: Cosine: the step at which the decay reaches the floor (and stays there).
    total_steps: int = 1000
    #: Floor as a fraction of peak: LLaMA decays to 10 % of peak rather than to zero.
    min_ratio: float = 0.1
    #: SGDR (Loshchilov & Hutter 2017): first period after warmup, in steps.
    t0: int = 100
    #: SGDR: each period is t_mult times the previous one (1 = equal periods).
    t_mult: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"schedule.kind must be one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}"
            )
        if not (
            isinstance(self.peak_lr, int | float)
            and math.isfinite(self.peak_lr)
            and self.peak_lr > 0
        ):
            raise ValueError(f"schedule.peak_lr must be a finite number > 0, got {self.peak_lr!r}")
        for name, low in (("warmup_steps", 0), ("total_steps", 1), ("t0", 1), ("t_mult", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"schedule.{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.min_ratio, int | float) and 0.0 <= self.min_ratio <= 1.0):
            raise ValueError(f"schedule.min_ratio must be in [0, 1], got {self.min_ratio!r}")
        if self.kind == "cosine" and self.warmup_steps > self.total_steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.warmup_steps}) must not exceed "
                f"schedule.total_steps ({self.total_steps}) for a cosine schedule"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"schedule.{unknown[0]} is not a schedule setting (known: {', '.join(sorted(known))})"
            )
        return cls(**data)


def _cosine(cfg: ScheduleConfig, progress: float) -> float:
    """Half a cosine from peak (progress 0) down to the floor (progress 1)."""
    floor = cfg.min_ratio * cfg.peak_lr
    return floor + (cfg.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _sgdr_position(cfg: ScheduleConfig, t: int) -> tuple[int, int]:
    """(steps into the current period, period length) for step t counted from the end of warmup."""
    period = cfg.t0
    if cfg.t_mult == 1:
        return t % period, period
    while t >= period:  # periods grow geometrically, so this loops O(log t) times
        t -= period
        period *= cfg.t_mult
    return t, period


def lr_at(cfg: ScheduleConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under ``cfg``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        # (step + 1) so that step 0 already moves the weights and the last warmup step hits peak.
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    t = step - cfg.warmup_steps
    if cfg.kind == "constant":
        return float(cfg.peak_lr)
    if cfg.kind == "cosine":
        span = max(1, cfg.total_steps - cfg.warmup_steps)
        return _cosine(cfg, min(1.0, t / span))
    t_cur, period = _sgdr_position(cfg, t)
    return _cosine(cfg, t_cur / period)


def restart_steps(cfg: ScheduleConfig, upto: int) -> list[int]:
    """The SGDR steps at which the LR jumps back to peak, all ``s <= upto`` (empty otherwise).

    >>> restart_steps(ScheduleConfig(kind="sgdr", warmup_steps=10, t0=20, t_mult=2), 100)
    [30, 70]
    """
    if cfg.kind != "sgdr":
        return []
    out: list[int] = []
    step, period = cfg.warmup_steps + cfg.t0, cfg.t0
    while step <= upto:
        out.append(step)
        period *= cfg.t_mult
        step += period
    return out
