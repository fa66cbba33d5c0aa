"""The Monitor's typed configuration: how often to report, how much to sample, which probes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROBES", "MonitorConfig"]

#: Probe families that can be switched on and off.
PROBES = ("act", "attn", "grad", "logits", "loss", "lr", "param", "throughput", "update")
GRAD_SOURCES = ("optimizer", "backward", "manual")


@dataclass
class MonitorConfig:
    """How the Monitor samples and reports.

    >>> MonitorConfig(every=10, probes=("loss", "grad")).every
    10
    """

    every: int = 1  # report steps with step % every == 0 (and the first step seen)
    sample_rows: int = 64  # query rows per attention probe; exact max when T <= sample_rows
    sample_batch: int | None = 4  # batch items the attention probe reads: bounds its cost
    sample_tokens: int = 512  # token positions for log Z; exact when B*T <= sample_tokens
    per_head: bool = True  # attn.logit_max per head (else one max per layer)
    probes: tuple[str, ...] = PROBES  # which probe families run
    # Where pre-clip gradients are read: the optimizer's step pre-hook (clipping inside step(),
    # as logitwatch's AdamW does), per-parameter post-accumulate hooks during backward (clipping
    # outside step(), as transformers.Trainer does), or only when record_grads() is called.
    grads: str = "optimizer"
    per_rank: bool = False  # under torch.distributed: every rank reports, labelled rank=N
    rank: int | None = None  # None: from torch.distributed, else the RANK variable, else 0
    max_pending: int = 16  # reports queued for the worker thread before new ones are dropped

    def __post_init__(self) -> None:
        for name in ("every", "sample_rows", "sample_tokens", "max_pending"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
        if self.sample_batch is not None and (
            isinstance(self.sample_batch, bool)
            or not isinstance(self.sample_batch, int)
            or self.sample_batch < 1
        ):
            raise ValueError(
                f"sample_batch must be an integer >= 1 or None; got {self.sample_batch!r}."
            )
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 0):
            raise ValueError(f"rank must be an integer >= 0 or None; got {self.rank!r}.")
        for name in ("per_head", "per_rank"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false; got {getattr(self, name)!r}.")
        if isinstance(self.probes, str):
            raise ValueError(f"probes must be a list of names, not the string {self.probes!r}.")
        self.probes = tuple(self.probes)
        unknown = [p for p in self.probes if p not in PROBES]
        if unknown:
            raise ValueError(f"probes: unknown probe {unknown[0]!r}; known: {', '.join(PROBES)}.")
        if self.grads not in GRAD_SOURCES:
            raise ValueError(f"grads must be one of {', '.join(GRAD_SOURCES)}; got {self.grads!r}.")
