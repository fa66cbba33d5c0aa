"""The Monitor's typed configuration: how often to report, how much to sample, which probes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROBES", "MonitorConfig"]

#: Probe families that can be switched on and off.
PROBES = ("act", "attn", "grad", "logits", "loss", "lr", "param", "throughput", "update")
GRAD_SOURCES = ("optimizer", "backward", "manual")
#: The default of MonitorConfig.param_every, rounded up to a multiple of every.
PARAM_EVERY = 10


@dataclass
class MonitorConfig:
    """How the Monitor samples and reports.

    Only averages are sampled, and maxima never are: ``attn.logit_max`` is the exact max
    |q·k/√d| over every batch item, query row and key it may attend, computed in chunks so
    memory stays bounded (about one causal half of q·kᵀ of compute per layer and reporting
    step). The attention entropies (``attn.entropy_*``) are means over ``sample_rows`` evenly
    spaced query rows of the first ``sample_batch`` batch items, from a matmul of those rows
    alone; log Z statistics are over ``sample_tokens`` evenly spaced token positions, while
    ``logits.*`` read every token. The weights (``param.norm``, ``update.ratio``) are read
    every ``param_every`` steps, on reporting steps: by default every 10th step.

    >>> MonitorConfig(every=10, probes=("loss", "grad")).every
    10
    """

    every: int = 1  # report steps with step % every == 0 (and the first step seen)
    # Steps between readings of the weights (param.norm, update.ratio), a multiple of every;
    # None: the first multiple of every at or above 10. A reading is a pass over every weight
    # plus a copy of them before the optimizer step (2-3 % of a small model's step on the
    # CPU), for numbers that move slowly (wandb.watch reads them every 1,000 steps by default).
    param_every: int | None = None
    # Query rows (evenly spaced, first and last included) per batch item in the entropy
    # means; all rows when T <= sample_rows. Bounds the entropy's exp pass, not the max.
    sample_rows: int = 64
    # Batch items in the entropy means (the first ones); None: all. Bounds the same pass.
    sample_batch: int | None = 4
    # Logits per chunk of the attention probes: bounds their transient memory (4 bytes each,
    # 2 in bf16 on an accelerator). None: 2^20 on the CPU, 2^27 on an accelerator, where
    # smaller chunks cost more kernel launches.
    attn_chunk: int | None = None
    sample_tokens: int = 512  # token positions for log Z; exact when B*T <= sample_tokens
    per_head: bool = True  # attn.logit_max per head (else one max per layer)
    probes: tuple[str, ...] = PROBES  # which probe families run
    # Where pre-clip gradients are read: the optimizer's step pre-hook (clipping inside step(),
    # as logitwatch's AdamW does), per-parameter post-accumulate hooks during backward (clipping
    # outside step(), as transformers.Trainer does), or only when record_grads() is called.
    grads: str = "optimizer"
    # Under torch.distributed every rank probes and joins one collective per reporting step.
    # False: rank 0 reports every rank's values combined (max of maxima, mean of means, global
    # norms: monitoring/reduce.py). True: every rank reports its own, labelled rank=N; grad,
    # param and update norms stay global (a shard's norm alone means nothing).
    per_rank: bool = False
    rank: int | None = None  # None: from torch.distributed, else the RANK variable, else 0
    max_pending: int = 16  # reports queued for the worker thread before new ones are dropped
    # close() waits this long for an unreachable service before it leaves the rest in the spool
    # (and says how to deliver it): long enough for a service restart, short enough for a job.
    close_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("every", "sample_rows", "sample_tokens", "max_pending"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
        p = self.param_every
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1
                              or p % self.every):  # fmt: skip
            raise ValueError(
                f"param_every must be None or a multiple of every={self.every}; got {p!r}."
            )
        for name in ("sample_batch", "attn_chunk"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be an integer >= 1 or None; got {value!r}.")
        c = self.close_timeout_s
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 <= c < float("inf"):
            raise ValueError(f"close_timeout_s must be a number of seconds >= 0; got {c!r}.")
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

    @property
    def weights_every(self) -> int:
        """Steps between readings of the weights: param_every, or its default."""
        if self.param_every is not None:
            return self.param_every
        return self.every * -(-PARAM_EVERY // self.every)
