"""The closed-form schedules of ``logitwatch.schedules`` as PyTorch ``LRScheduler``s.

Each group's LR at scheduler step ``s`` is ``base_lr * lr_at(shape, s)`` with ``shape.peak_lr = 1``,
so one formula serves the trainer, users' own loops and the service's "LR off schedule" rule.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from logitwatch.schedules import ScheduleConfig, lr_at

__all__ = ["SGDR", "Constant", "WarmupCosine", "build_scheduler"]


class _ClosedForm(LRScheduler):
    """An LRScheduler whose LR is a pure function of the step: resumable and replayable."""

    def __init__(self, optimizer: Optimizer, shape: ScheduleConfig, last_epoch: int = -1) -> None:
        if shape.peak_lr != 1.0:
            raise ValueError("schedule.peak_lr must be 1.0 here: each group's own lr is its peak")
        self.shape = shape  # set before super(): its __init__ already calls get_lr()
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[Any]:
        factor = lr_at(self.shape, max(0, self.last_epoch))
        return [base * factor for base in self.base_lrs]

    # step(epoch) is deprecated in torch but still routed here; the formula is closed anyway.
    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        # Plain types only, so a checkpoint loads with torch.load(weights_only=True).
        return {**super().state_dict(), "shape": self.shape.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        state["shape"] = ScheduleConfig.from_dict(state["shape"])
        super().load_state_dict(state)


class WarmupCosine(_ClosedForm):
    """Linear warmup to each group's lr, then cosine decay to ``min_ratio`` of it (LLaMA: 0.1).

    >>> import torch
    >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    >>> sched = WarmupCosine(opt, warmup_steps=10, total_steps=100)
    >>> opt.param_groups[0]["lr"]
    0.0001
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        shape = ScheduleConfig("cosine", 1.0, warmup_steps, total_steps, min_ratio)
        super().__init__(optimizer, shape, last_epoch)


class SGDR(_ClosedForm):
    """Warm restarts (Loshchilov & Hutter): cosine periods of t0, t0·t_mult, … after warmup.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    >>> sched = SGDR(opt, t0=2, min_ratio=0.0)
    >>> lrs = []
    >>> for _ in range(4):
    ...     lrs.append(round(opt.param_groups[0]["lr"], 3)); opt.step(); sched.step()
    >>> lrs
    [1.0, 0.5, 1.0, 0.5]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        t0: int,
        t_mult: int = 1,
        warmup_steps: int = 0,
        min_ratio: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        shape = ScheduleConfig(
            "sgdr", 1.0, warmup_steps, max(1, warmup_steps), min_ratio, t0, t_mult
        )
        super().__init__(optimizer, shape, last_epoch)


class Constant(_ClosedForm):
    """Each group's lr throughout, after an optional linear warmup."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, last_epoch: int = -1) -> None:
        shape = ScheduleConfig("constant", 1.0, warmup_steps, max(1, warmup_steps))
        super().__init__(optimizer, shape, last_epoch)


def build_scheduler(optimizer: Optimizer, cfg: ScheduleConfig) -> LRScheduler:
    """The scheduler for ``cfg``; sets every param group's lr to ``cfg.peak_lr`` first.

    >>> import torch
    >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    >>> sched = build_scheduler(opt, ScheduleConfig("constant", peak_lr=0.01))
    >>> sched.get_last_lr()
    [0.01]
    """
    for group in optimizer.param_groups:
        group["lr"] = cfg.peak_lr
        group.pop("initial_lr", None)  # a fresh schedule: its base is the new peak
    if cfg.kind == "cosine":
        return WarmupCosine(optimizer, cfg.warmup_steps, cfg.total_steps, cfg.min_ratio)
    if cfg.kind == "sgdr":
        return SGDR(optimizer, cfg.t0, cfg.t_mult, cfg.warmup_steps, cfg.min_ratio)
    return Constant(optimizer, cfg.warmup_steps)
