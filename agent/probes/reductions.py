"""On-device probe reductions and the flat buffer they write into.

Every function here takes tensors the model already made, runs under ``no_grad`` in fp32
accumulation, and returns a small 1-D tensor on the same device: nothing syncs with the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from logitwatch.agent.transport.sink import SeriesKey

__all__ = [
    "ATTN_FIELDS",
    "LOGITS_FIELDS",
    "Slots",
    "act_rms",
    "attn_logit_absmax",
    "attn_stats",
    "chunk_budget",
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
    # Under torch.compile the cache is bypassed: a global dict that fills up during tracing
    # would fail its guards on the next call and cost a recompile.
    compiling = torch.compiler.is_compiling()
    rows = None if compiling else _rows_cache.get(key)
    if rows is None:
        if n <= k:
            rows = torch.arange(n, device=device)
        else:
            # Spacing (n-1)/(k-1) > 1, so rounding never merges two rows (no unique(): a sync).
            rows = torch.linspace(0, n - 1, k, device=device).round().long()
        if not compiling:
            _rows_cache[key] = rows
    return rows


_masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _causal(
    rows: torch.Tensor, Tq: int, Tk: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, R, Tk) "may attend" and its additive 0/-inf twin, cached; query row i sits at key
    position i + (Tk - Tq) (a KV cache precedes the queries)."""
    key = (Tq, rows.numel(), Tk, causal, rows.device)
    compiling = torch.compiler.is_compiling()  # no cache under compile: see even_rows
    hit = None if compiling else _masks.get(key)
    if hit is None:
        keys = torch.arange(Tk, device=rows.device)
        allowed = keys[None, :] <= rows[:, None] + (Tk - Tq) if causal else keys[None, :] >= 0
        allowed = allowed.view(1, 1, -1, Tk)
        bias = torch.zeros(allowed.shape, device=rows.device).masked_fill_(~allowed, float("-inf"))
        hit = (allowed, bias)
        if not compiling:
            _masks[key] = hit
    return hit


def _rms(x: torch.Tensor) -> torch.Tensor:
    # vector_norm with dtype accumulates in fp32 without an fp32 copy of x.
    return torch.linalg.vector_norm(x, dtype=torch.float32) / math.sqrt(max(x.numel(), 1))


#: Logits one chunk of an attention probe holds, when not configured (MonitorConfig.attn_chunk).
#: Either way the probe's memory is bounded whatever B, H and T are: B·H·Tq·Tk is never
#: materialised. On the CPU, measured inside a training step on 2 cores: 2^20 ~20 % faster
#: than 2^18 (fewer chunks, each still cache-sized), no gain beyond; on an accelerator larger
#: chunks mean fewer kernel launches.
CHUNK_ELEMS_CPU = 1 << 20  # 4 MiB in fp32
CHUNK_ELEMS_DEVICE = 1 << 27  # 256 MiB in bf16, 512 MiB in fp32


def chunk_budget(device: torch.device, configured: int | None = None) -> int:
    """Logits per chunk: ``configured``, else the default for the device's type."""
    if configured:
        return configured
    return CHUNK_ELEMS_CPU if device.type == "cpu" else CHUNK_ELEMS_DEVICE


def _plan(B: int, H: int, Tq: int, Tk: int, causal: bool, budget: int) -> tuple[int, int]:
    """(batch items, query rows) per chunk of the exact maximum."""
    rows = max(1, min(Tq, budget // (H * Tk)))
    if causal and Tq >= 64:
        # Causal chunks of a quarter of the rows skip 3/8 of q·kᵀ (the keys past each chunk).
        rows = min(rows, -(-Tq // 4))
    return max(1, min(B, budget // (H * rows * Tk))), rows


def _matmul_dtype(q: torch.Tensor) -> torch.dtype:
    # Accelerators multiply bf16 on their matrix units at 10-20x the fp32 rate, accumulating in
    # fp32: each logit then carries one rounding to bf16 (at most 2^-8, 0.4 %), as the model's
    # own attention scores do. fp16 would overflow at |q·k| > 65504. On the CPU, fp32: exact.
    return torch.bfloat16 if q.dtype == torch.bfloat16 and q.device.type != "cpu" else torch.float32


def _may_attend(mask: torch.Tensor) -> torch.Tensor:
    """A bool "may attend" mask from a bool or an additive float one (-inf or dtype-min hides)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


@torch.no_grad()
def attn_logit_absmax(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    causal: bool = True,
    mask: torch.Tensor | None = None,
    chunk_elems: int | None = None,
) -> torch.Tensor:
    """Per-head max |q·k·scale| over every batch item, query row and key it may attend: (H,).

    q (B, H, Tq, hs) and k (B, Hkv, Tk, hs), before scaling and soft-capping; query row i sits
    at key position i + Tk - Tq (a KV cache precedes the queries). Exact (bf16 inputs on an
    accelerator: up to one bf16 rounding of each logit), computed in chunks of whole batch
    items and query rows of at most ``chunk_elems`` logits each; a causal chunk multiplies only
    the keys its last row may see. ``mask``: bool "may attend" or additive float, (B|1, 1|H,
    Tq, Tk). A head that may attend nothing reads 0.
    """
    return _absmax_sq(q, k, causal, mask, chunk_elems)[0] * scale


def _absmax_sq(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    chunk_elems: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attn_logit_absmax before scaling (fp32), and the sums of squares of q and of k, read
    from each chunk while it is in cache rather than in two more passes over q and k."""
    B, H, Tq, hs = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    off = Tk - Tq
    bc, rc = _plan(B, H, Tq, Tk, causal, chunk_budget(q.device, chunk_elems))
    dtype = _matmul_dtype(q)
    mask = _may_attend(mask) if mask is not None else None
    found, q_norms, k_norms = [], [], []
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        # Contiguous: a strided k (the usual transpose of (B, T, H, hs)) cannot be batched by
        # bmm and would be copied again for every row chunk.
        kc = k[b0:b1].to(dtype).contiguous()  # (b, Hkv, Tk, hs)
        k_norms.append(torch.linalg.vector_norm(kc, dtype=torch.float32))
        kt = kc.transpose(-2, -1)  # (b, Hkv, hs, Tk)
        for r0 in range(0, Tq, rc):
            r1 = min(Tq, r0 + rc)
            # GQA without copying k: the G query heads of a kv head (h = kv·G + g, as
            # repeat_interleave lays them out) are stacked along the row axis and share one
            # matmul with their k.
            qc = q[b0:b1, :, r0:r1].to(dtype)  # (b, H, c, hs)
            q_norms.append(torch.linalg.vector_norm(qc, dtype=torch.float32))
            n_keys = max(0, min(Tk, r1 + off)) if causal else Tk  # keys the chunk's last row sees
            if n_keys == 0:
                continue
            # A view when G is 1 (bmm reads the strided rows), else a copy of the chunk.
            qc = qc.reshape(b1 - b0, Hkv, -1, hs)  # (b, Hkv, G·c, hs)
            att = qc @ kt[..., :n_keys]  # (b, Hkv, G·c, n_keys)
            grid = att.view(b1 - b0, H, r1 - r0, n_keys)  # (b, H, c, n_keys)
            # Hidden logits become 0, which never beats a max of magnitudes.
            if causal and r0 + off < n_keys - 1:
                grid.tril_(r0 + off)  # row r0 + i sees keys <= r0 + i + off
            if mask is not None:
                m = mask[b0:b1] if mask.size(0) > 1 else mask
                grid.masked_fill_(~m[:, :, r0:r1, :n_keys], 0.0)
            # max |x| as max(max, -min) over each head's contiguous c·n_keys run: two
            # vectorised reads (abs-max reductions, the inf-norm, are ~40x slower on the CPU).
            flat = att.view(b1 - b0, H, -1)
            found.append(torch.maximum(flat.amax(-1), flat.amin(-1).neg_()))  # (b, H)
    # The scale is positive, so it scales the max: applied once, by the caller, in fp32.
    absmax = torch.cat(found).amax(0).float() if found else torch.zeros(H, device=q.device)
    sq = [torch.stack(n).square().sum() for n in (q_norms, k_norms)]
    return absmax, sq[0], sq[1]


def _entropy(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    rows: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy in nats of the softmax of each of ``rows`` (B, H, R), and its keys (b, h, R)."""
    B, H, Tq, hs = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    R = rows.numel()
    qs = q.index_select(2, rows).float() * scale  # (B, H, R, hs), scaled: R·hs < R·Tk
    att = qs.reshape(B, Hkv, -1, hs) @ k.float().transpose(-2, -1)  # (B, Hkv, G·R, Tk)
    att = att.view(B, H, R, Tk)
    allowed, bias = _causal(rows, Tq, Tk, causal)  # (1, 1, R, Tk)
    if mask is None:
        att.add_(bias)  # an add of 0/-inf is ~4x faster than masked_fill on CPU
    else:
        allowed = allowed & mask[..., :Tk].index_select(-2, rows)
        att.masked_fill_(~allowed, float("-inf"))
    row_max = att.amax(dim=-1, keepdim=True)  # (B, H, R, 1)
    # One exp pass: with d = a - max, p = e^d / s and H = log s - sum(e^d · d) / s. Clamping d
    # at -80 keeps exp off its slow underflow path (e^-80 ~ 1e-35: no effect on H) and turns
    # masked -inf into terms that vanish instead of 0 · -inf = NaN.
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)  # fully masked rows
    d = att.sub_(row_max).clamp_(min=-80.0)
    e = d.exp()
    s = e.sum(-1)  # (B, H, R)
    return s.log() - e.mul_(d).sum(-1) / s, allowed.sum(-1)


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
    chunk_elems: int | None = None,
) -> torch.Tensor:
    """Per-head max |logit|, then entropy min/mean/frac and q/k RMS: a (n_heads + 5,) tensor.

    q (B, H, Tq, hs) and k (B, Hkv, Tk, hs), before scaling and soft-capping. The max is exact:
    ``attn_logit_absmax`` over all batch items and query rows, in chunks. Only the averages are
    sampled: entropies are over ``sample_rows`` evenly spaced query rows (all when Tq <= it) of
    the first ``sample_batch`` batch items (all when None), in chunks of whole batch items,
    leaving out rows with fewer than two keys (their entropy is 0 by construction);
    entropy_min/mean are the min/mean over heads of each head's mean entropy. q/k RMS are over
    everything. ``mask``: as in attn_logit_absmax.
    """
    budget = chunk_budget(q.device, chunk_elems)
    absmax, q_sq, k_sq = _absmax_sq(q, k, causal, mask, budget)
    logit_max = absmax * scale  # (H,)
    q_rms, k_rms = (q_sq / max(q.numel(), 1)).sqrt(), (k_sq / max(k.numel(), 1)).sqrt()
    mask = _may_attend(mask) if mask is not None else None
    Bs = q.size(0) if sample_batch is None else min(q.size(0), sample_batch)
    H, Tq, Tk = q.size(1), q.size(2), k.size(2)
    rows = even_rows(Tq, sample_rows, q.device)  # (R,)
    step = max(1, budget // (H * rows.numel() * Tk))  # batch items per chunk
    per_item = mask is not None and mask.size(0) > 1  # else the keys per row are shared
    ents, keys = [], []
    for b0 in range(0, Bs, step):
        b1 = min(Bs, b0 + step)
        m = mask[b0:b1] if per_item else mask
        ent, n = _entropy(q[b0:b1], k[b0:b1], scale, rows, causal, m)
        ents.append(ent)
        keys.append(n)
    ent = torch.cat(ents) if len(ents) > 1 else ents[0]  # (Bs, H, R) nats
    n_keys = torch.cat(keys) if per_item and len(keys) > 1 else keys[0]  # (Bs|1, H|1, R)
    w = (n_keys >= 2).float().expand_as(ent)  # rows with one key have entropy 0 by construction
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
        # Called first thing in take(): writers that defer their writes (ProbeSet.drain).
        self.before_take: list[Callable[[], None]] = []

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
        for drain in list(self.before_take):
            drain()
        out = [self.blocks[n] for n in self.written]
        self.written = set()
        return out

    def reset(self) -> None:
        """Forget the layout: the next writes lay their blocks out afresh (under
        torch.distributed, all ranks at once, when their layouts disagreed)."""
        self.blocks, self.used, self.written = {}, 0, set()
