"""On-device probe reductions and the flat buffer they write into.

Every function here takes tensors the model already made, runs under ``no_grad`` in fp32
accumulation, and returns a small 1-D tensor on the same device: nothing syncs with the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from logitwatch.agent.transport.sink import SeriesKey

__all__ = [
    "ATTN_FIELDS",
    "LOGITS_FIELDS",
    "Slots",
    "act_rms",
    "attn_stats",
    "even_rows",
    "logits_stats",
]

#: Per-layer scalars after the per-head maxima in ``attn_stats``'s output.
ATTN_FIELDS = (
    "attn.entropy_min",
    "attn.entropy_mean",
    "attn.entropy_frac",
    "attn.q_norm",
    "attn.k_norm",
)
#: Order of ``logits_stats``'s output; "_nonfinite.logits" is summed into nonfinite.count.
LOGITS_FIELDS = (
    "logits.max_abs",
    "logits.rms",
    "logits.mean",
    "logz.mean",
    "logz.std",
    "logz.max",
    "logz.min",
    "_nonfinite.logits",
)

_rows_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def even_rows(n: int, k: int, device: torch.device) -> torch.Tensor:
    """Indices of k evenly spaced rows out of n, always the first and last; all rows if n <= k."""
    key = (n, k, device)
    rows = _rows_cache.get(key)
    if rows is None:
        if n <= k:
            rows = torch.arange(n, device=device)
        else:
            # Spacing (n-1)/(k-1) > 1, so rounding never merges two rows (no unique(): a sync).
            rows = torch.linspace(0, n - 1, k).round().long().to(device)
        _rows_cache[key] = rows
    return rows


_masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _causal(
    rows: torch.Tensor, Tq: int, Tk: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, R, Tk) "may attend" and its additive 0/-inf twin, cached; query row i sits at key
    position i + (Tk - Tq) (a KV cache precedes the queries)."""
    key = (Tq, rows.numel(), Tk, causal, rows.device)
    hit = _masks.get(key)
    if hit is None:
        keys = torch.arange(Tk, device=rows.device)
        allowed = keys[None, :] <= rows[:, None] + (Tk - Tq) if causal else keys[None, :] >= 0
        allowed = allowed.view(1, 1, -1, Tk)
        bias = torch.zeros(allowed.shape, device=rows.device).masked_fill_(~allowed, float("-inf"))
        _masks[key] = hit = (allowed, bias)
    return hit


def _rms(x: torch.Tensor) -> torch.Tensor:
    # vector_norm with dtype accumulates in fp32 without an fp32 copy of x.
    return torch.linalg.vector_norm(x, dtype=torch.float32) / math.sqrt(max(x.numel(), 1))


@torch.no_grad()
def attn_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    sample_rows: int = 64,
    sample_batch: int | None = None,
    causal: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head max logit, then entropy min/mean/frac and q/k RMS: a (n_heads + 5,) tensor.

    q (B, H, Tq, hs) and k (B, Hkv, Tk, hs), before scaling and soft-capping. The max is exact
    over the sampled query rows (all rows when Tq <= sample_rows) with the causal mask (and
    ``mask``: bool "may attend" or additive float, (B|1, 1|H, Tq, Tk)) applied. Entropies are
    over the same rows, leaving out rows with fewer than two keys (their entropy is 0 by
    construction); entropy_min/mean are the min/mean over heads of each head's mean entropy.
    """
    q_rms, k_rms = _rms(q), _rms(k)
    if sample_batch is not None and q.size(0) > sample_batch:
        q, k = q[:sample_batch], k[:sample_batch]
        mask = mask[:sample_batch] if mask is not None and mask.size(0) > 1 else mask
    B, H, Tq, hs = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    rows = even_rows(Tq, sample_rows, q.device)  # (R,)
    R = rows.numel()
    # GQA without copying k: the G query heads of a kv head (h = kv·G + g, as repeat_interleave
    # lays them out) are stacked along the row axis and share one matmul with their k.
    qs = q.index_select(2, rows).float() * scale  # (B, H, R, hs), scaled: R·hs < R·Tk
    att = qs.reshape(B, Hkv, -1, hs) @ k.float().transpose(-2, -1)  # (B, Hkv, G·R, Tk)
    att = att.view(B, H, R, Tk)
    allowed, bias = _causal(rows, Tq, Tk, causal)  # (1, 1, R, Tk)
    if mask is None:
        att.add_(bias)  # an add of 0/-inf is ~4x faster than masked_fill on CPU
    else:
        m = mask[..., :Tk].index_select(-2, rows)
        m = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        allowed = allowed & m
        att.masked_fill_(~allowed, float("-inf"))
    row_max = att.amax(dim=-1, keepdim=True)  # (B, H, R, 1)
    logit_max = row_max.amax(dim=(0, 2, 3))  # (H,)
    # Entropy in one exp pass: with d = a - max, p = e^d / s and H = log s - sum(e^d · d) / s.
    # Clamping d at -80 keeps exp off its slow underflow path (e^-80 ~ 1e-35: no effect on H)
    # and turns masked -inf into terms that vanish instead of 0 · -inf = NaN.
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)  # fully masked rows
    d = att.sub_(row_max).clamp_(min=-80.0)
    e = d.exp()
    s = e.sum(-1)  # (B, H, R)
    ent = s.log() - e.mul_(d).sum(-1) / s  # (B, H, R) nats
    n_keys = allowed.sum(-1)  # (b, h, R)
    w = (n_keys >= 2).float().expand(B, H, R)  # rows with one key have entropy 0 by construction
    per_head = (ent * w).sum((0, 2)) / w.sum((0, 2)).clamp_min(1.0)  # (H,)
    frac = (ent / n_keys.clamp_min(2).float().log() * w).sum() / w.sum().clamp_min(1.0)
    tail = torch.stack([per_head.min(), per_head.mean(), frac, q_rms, k_rms])
    return torch.cat([logit_max, tail])


@torch.no_grad()
def logits_stats(logits: torch.Tensor, *, sample_tokens: int = 512) -> torch.Tensor:
    """The LOGITS_FIELDS of logits (..., V): magnitudes over all tokens, log Z and the
    non-finite count over evenly spaced sampled token positions (all when few)."""
    x = logits.detach()
    lo, hi = torch.aminmax(x)
    max_abs = torch.maximum(hi.abs(), lo.abs()).float()
    mean = x.mean(dtype=torch.float32)
    flat = x.reshape(-1, x.size(-1))
    rows = flat.index_select(0, even_rows(flat.size(0), sample_tokens, x.device)).float()
    log_z = torch.logsumexp(rows, dim=-1)  # (N,)
    std = log_z.std(correction=0) if log_z.numel() > 1 else torch.zeros_like(log_z[0])
    nonfinite = (~torch.isfinite(rows)).sum().float()
    return torch.stack(
        [max_abs, _rms(x), mean, log_z.mean(), std, log_z.max(), log_z.min(), nonfinite]
    )


@torch.no_grad()
def act_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS of a residual-stream tensor, as a (1,) tensor."""
    return _rms(x.detach()).reshape(1)


class Slots:
    """A flat fp32 device buffer with one slot per series, allocated in named blocks.

    Blocks are laid out on first write (the first reporting step); later steps reuse them,
    so steady-state writes are one ``copy_`` each and the host reads the buffer in one copy.
    """

    def __init__(self, device: torch.device | str, capacity: int = 256) -> None:
        self.device = torch.device(device)
        self.buf = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        self.used = 0
        self.blocks: dict[object, tuple[int, tuple[SeriesKey, ...]]] = {}
        self.written: set[object] = set()

    def write(self, name: object, keys: Sequence[SeriesKey], values: torch.Tensor) -> None:
        keys = tuple(keys)
        block = self.blocks.get(name)
        if block is None or block[1] != keys:
            block = self._allocate(name, keys)
        start = block[0]
        self.buf[start : start + len(keys)].copy_(values.reshape(-1), non_blocking=True)
        self.written.add(name)

    def _allocate(self, name: object, keys: tuple[SeriesKey, ...]) -> tuple[int, tuple]:
        need = self.used + len(keys)
        if need > self.buf.numel():
            grown = torch.zeros(max(need, 2 * self.buf.numel()), device=self.device)
            grown[: self.used].copy_(self.buf[: self.used])
            self.buf = grown
        self.blocks[name] = block = (self.used, keys)
        self.used = need
        return block

    def take(self) -> list[tuple[int, tuple[SeriesKey, ...]]]:
        """The (start, keys) of blocks written since the last take; clears the marks."""
        out = [self.blocks[n] for n in self.written]
        self.written = set()
        return out
