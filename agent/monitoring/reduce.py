"""How each metric combines across ranks under torch.distributed (``RANK_REDUCE``), and the
on-device reduction of the gathered rows into one value per series (``combine``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from logitwatch.agent.transport.sink import SeriesKey

__all__ = ["GLOBAL_OPS", "OPS", "RANK_REDUCE", "Plan", "combine", "make_plan"]

#: Op codes, in the order ``combine`` stacks its candidates.
OPS = ("own", "sum", "mean", "rms", "max", "min", "std", "norm", "ratio")
OWN, SUM, MEAN, RMS, MAX, MIN, STD, NORM, RATIO = range(len(OPS))

#: How the ranks' values of each catalogue metric combine into the one value rank 0 reports.
#: Per-rank values come from each rank's own data, in equally many items per rank (the same
#: batch shape on every rank), which makes mean, rms and std exact over the union:
#:
#: - max / min: the extreme anywhere (the largest logit on any rank is the one that matters);
#:   ``attn.entropy_min`` is the least of the ranks' per-head minima;
#: - mean: the mean of the ranks' means (loss, entropy, logit and log Z means);
#: - rms: sqrt(mean of the ranks' squared RMS) — the RMS over the union;
#: - std: pooled with the same series' mean (``STD_MEAN``): sqrt(mean(std² + mean²) − mean²);
#: - sum: counts and rates (non-finite values, tokens per second);
#: - norm: each rank sends its share of a squared L2 norm (its FSDP2 shards, or 1/world of a
#:   DDP replica) and the norm is the root of the sum: exact, not an average of norms;
#: - ratio: sqrt(Σ‖w − w_prev‖² / Σ‖w_prev‖²) over the same shares (the update ratio);
#: - own: the reporting rank's value; the LR is equal on every rank, actions being broadcast.
RANK_REDUCE: dict[str, str] = {
    "loss": "mean",
    "loss.ce": "mean",
    "loss.z": "mean",
    "lr": "own",
    "logits.max_abs": "max",
    "logits.rms": "rms",
    "logits.mean": "mean",
    "logz.mean": "mean",
    "logz.std": "std",
    "logz.max": "max",
    "logz.min": "min",
    "attn.logit_max": "max",
    "attn.entropy_min": "min",
    "attn.entropy_mean": "mean",
    "attn.entropy_frac": "mean",
    "attn.q_norm": "rms",
    "attn.k_norm": "rms",
    "grad.norm": "norm",
    "param.norm": "norm",
    "update.ratio": "ratio",
    "act.rms": "rms",
    "nonfinite.count": "sum",
    "throughput.tokens_per_s": "sum",
}
#: With ``per_rank`` on each rank reports its own values, except these: a shard's norm alone
#: means nothing, so they stay global.
GLOBAL_OPS = ("norm", "ratio")
#: The mean a pooled std needs, by the std's metric.
STD_MEAN = {"logz.std": "logz.mean"}
#: Prefix of the internal series holding a ratio's denominator (never reported).
DEN = "_den."


@dataclass
class Plan:
    """Per-slot op codes, partner slots and owning blocks of one buffer layout, on the device."""

    code: torch.Tensor  # (n,) long: index into OPS
    partner: torch.Tensor  # (n,) long: the std's mean, the ratio's denominator, else itself
    block: torch.Tensor  # (n,) long: the slot's block; nb for slots in no block
    whole: torch.Tensor  # (nb,) bool: the block sums shares (norms), so it needs every rank's


def _op(metric: str, per_rank: bool) -> int:
    if metric.startswith(("_nonfinite.", DEN)):  # partial counts and denominators add up
        name = "own" if per_rank and not metric.startswith(DEN) else "sum"
    else:
        name = RANK_REDUCE.get(metric, "mean")
        if per_rank and name not in GLOBAL_OPS:
            name = "own"
    return OPS.index(name)


def make_plan(
    layout: Sequence[tuple[int, tuple[SeriesKey, ...]]],
    used: int,
    per_rank: bool,
    device: torch.device,
) -> Plan:
    """The Plan of blocks ``layout`` ((start, keys), by start) in a buffer of ``used`` slots."""
    code, partner, block = [MEAN] * used, list(range(used)), [len(layout)] * used
    whole = [False] * len(layout)
    where: dict[SeriesKey, int] = {}
    for b, (start, keys) in enumerate(layout):
        for i, key in enumerate(keys):
            where[key] = start + i
            block[start + i] = b
            code[start + i] = _op(key[0], per_rank)
            whole[b] = whole[b] or OPS[code[start + i]] in GLOBAL_OPS
    for key, i in where.items():
        op = OPS[code[i]]
        other = None
        if op == "ratio":
            other = where.get((DEN + key[0], key[1]))
        elif op == "std":
            other = where.get((STD_MEAN.get(key[0], ""), key[1]))
        if other is not None:
            partner[i] = other
        elif op in ("ratio", "std"):  # no partner: the closest thing that needs none
            code[i] = NORM if op == "ratio" else RMS

    def tensor(values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device)

    return Plan(tensor(code), tensor(partner), tensor(block), tensor(whole, torch.bool))


@torch.no_grad()
def combine(flags: torch.Tensor, values: torch.Tensor, plan: Plan, rank: int) -> torch.Tensor:
    """One value per slot from every rank's row: ``values`` (W, n), ``flags`` (W, nb) with 1
    where that rank wrote the block this step. NaN where no rank wrote it; a NaN a rank did
    write propagates (a non-finite value must not hide behind the other ranks')."""
    W = values.size(0)
    written = torch.cat([flags, flags.new_zeros(W, 1)], 1)[:, plan.block] > 0  # (W, n)
    count = written.sum(0).to(values.dtype)
    c = count.clamp_min(1.0)
    z = values.masked_fill(~written, 0.0)
    s, s2 = z.sum(0), (z * z).sum(0)
    p = plan.partner
    pooled_var = ((s2 + s2[p]) / c - (s[p] / c).square()).clamp_min(0.0)
    candidates = torch.stack(
        [
            values[rank],
            s,
            s / c,
            (s2 / c).sqrt(),
            values.masked_fill(~written, float("-inf")).amax(0),
            values.masked_fill(~written, float("inf")).amin(0),
            pooled_var.sqrt(),
            s.sqrt(),
            (s / s[p].clamp_min(1e-30)).sqrt(),
        ]
    )
    out = candidates.gather(0, plan.code.view(1, -1)).view(-1)
    seen = torch.where(plan.code == OWN, written[rank], count > 0)
    return torch.where(seen, out, torch.full_like(out, float("nan")))
