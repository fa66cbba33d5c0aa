"""On-device probe reductions and the flat buffer they write into.

Every function here takes tensors the model already made, runs under ``no_grad`` in fp32
accumulation, and returns a small 1-D tensor on the same device: nothing syncs with the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from logitwatch.agent.transport.sink import SeriesKey

_T = TypeVar("_T")

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

_cache: dict[tuple, object] = {}
_LOG2E, _LN2 = 1.0 / math.log(2.0), math.log(2.0)


def _cached(key: tuple, make: Callable[[], _T]) -> _T:
    """``make()``, made once per ``key``. Under torch.compile the cache is bypassed: a global
    dict that fills up during tracing would fail its guards on the next call and cost a
    recompile."""
    compiling = torch.compiler.is_compiling()
    hit = None if compiling else _cache.get(key)
    if hit is None:
        hit = make()
        if not compiling:
            _cache[key] = hit
    return hit  # type: ignore[return-value]


def spaced(n: int, k: int) -> tuple[int, ...]:
    """k evenly spaced indices out of n, always the first and last (nearest, ties up); all n
    when n <= k. The spacing (n-1)/(k-1) is above 1, so rounding never merges two of them."""
    if n <= k:
        return tuple(range(n))
    if k == 1:
        return (0,)
    return tuple((2 * i * (n - 1) + k - 1) // (2 * (k - 1)) for i in range(k))


def _index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    """``rows`` as a long tensor on ``device``, cached."""
    rows = tuple(rows)
    return _cached(("index", rows, device), lambda: torch.tensor(rows, device=device))


def even_rows(n: int, k: int, device: torch.device) -> torch.Tensor:
    """Indices of k evenly spaced rows out of n (``spaced``), as a tensor on ``device``."""
    return _cached(("even", n, k, device), lambda: torch.tensor(spaced(n, k), device=device))


def _causal(
    rows: Sequence[int], off: int, n_keys: int, causal: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, 1, R, n_keys) "may attend" of query ``rows`` over the first ``n_keys`` keys, its
    additive 0/-inf twin and (1, 1, R) the keys each row may attend, cached; query row i sits
    at key position i + off (a KV cache of ``off`` keys precedes the queries)."""

    def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if causal:
            keys = torch.arange(n_keys, device=device)
            allowed = keys[None, :] <= _index(rows, device)[:, None] + off  # (R, n_keys)
        else:
            allowed = torch.ones(len(rows), n_keys, dtype=torch.bool, device=device)
        allowed = allowed.view(1, 1, -1, n_keys)
        bias = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))
        return allowed, bias, allowed.sum(-1)

    return _cached(("causal", tuple(rows), off, n_keys, causal, device), make)


def _l2(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of x in fp32: a BLAS dot of contiguous fp32 with itself (~2.4x faster than
    vector_norm on the CPU, measured on a 2 MiB q), else vector_norm, which accumulates other
    dtypes in fp32 without an fp32 copy of x."""
    if x.dtype == torch.float32 and x.is_contiguous():
        flat = x.view(-1)
        return torch.dot(flat, flat).sqrt()
    return torch.linalg.vector_norm(x, dtype=torch.float32)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return _l2(x) / math.sqrt(max(x.numel(), 1))


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


def _bmm_ready(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``t`` (b, H, c, hs) if bmm can read it as (b·H/groups, groups·c, hs) in place: rows of
    unit stride, batch dims that fold into one stride and, with GQA, the ``groups`` heads of a
    kv head one after the other (a slice of query rows of (B, H, T, hs) memory, as RoPE
    leaves it); else a contiguous copy (of (B, T, H, hs) memory transposed, say), made once
    here rather than inside bmm."""
    b, H, c, hs = t.shape
    s0, s1, s2, s3 = t.stride()
    if s3 == 1 and s2 >= hs and (b == 1 or s0 == H * s1) and (groups == 1 or s1 == c * s2):
        return t
    return t.contiguous()


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
    budget = chunk_budget(q.device, chunk_elems)
    return _attn_pass(q, k, causal, mask, budget).absmax * scale


@dataclass
class _Pass:
    absmax: torch.Tensor  # (H,) max |q·k| before scaling, fp32
    q_norm: torch.Tensor  # () L2 norm of q
    k_norm: torch.Tensor  # () L2 norm of k


def _norm(parts: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of the whole from its parts' norms."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).square().sum().sqrt()


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _attn_pass(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    budget: int,
) -> _Pass:
    """One chunked pass over q·kᵀ: the per-head max |q·k| and the sums of squares of q and k.

    A causal chunk of query rows is two matmuls: the keys all of its rows see, which need no
    mask, and the triangle where its rows' keys end, masked in place; without a KV cache or a
    mask the triangles of all row chunks are one batched matmul. Against one matmul over all
    of a chunk's keys masked as a whole, ~25 % faster on the CPU (measured: 1.03 against 1.40
    ms for B 8, H 4, T 256, hs 64), for the same products."""
    B, H, Tq, hs = q.shape
    Hkv, Tk = k.size(1), k.size(2)
    off = Tk - Tq
    bc, rc = _plan(B, H, Tq, Tk, causal, budget)
    dtype = _matmul_dtype(q)
    mask = _may_attend(mask) if mask is not None else None
    per_item = mask is not None and mask.size(0) > 1  # else the keys per row are shared
    # Per chunk (b, H) maxima and minima (negated and compared once, at the end), and norms:
    # a probe is dozens of small ops a layer, each costing its dispatch.
    tops, bottoms, q_norm, k_norm = [], [], [], []
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        b = b1 - b0
        # Contiguous: a strided k (the usual transpose of (B, T, H, hs)) cannot be batched by
        # bmm and would be copied again for every row chunk.
        kc = k[b0:b1].to(dtype).contiguous()  # (b, Hkv, Tk, hs)
        k_norm.append(_l2(kc))
        kt = kc.transpose(-2, -1)  # (b, Hkv, hs, Tk)
        # A norm reads contiguous memory ~8x faster than row chunks of it: one for the batch
        # chunk's q when it is contiguous, else one per (copied) row chunk.
        whole_q = q[b0:b1].is_contiguous()
        if whole_q:
            q_norm.append(_l2(q[b0:b1]))
        mb = (mask[b0:b1] if per_item else mask) if mask is not None else None
        # The triangles on the diagonal, all row chunks at once.
        diagonal = causal and mask is None and off == 0 and Tq % rc == 0
        if diagonal:
            _diagonal_extremes(q[b0:b1].to(dtype), kc, rc, tops, bottoms)
        for r0 in range(0, Tq, rc):
            r1 = min(Tq, r0 + rc)
            qc = _bmm_ready(q[b0:b1, :, r0:r1].to(dtype), H // Hkv)  # (b, H, c, hs)
            if not whole_q:
                q_norm.append(_l2(qc))
            n_keys = max(0, min(Tk, r1 + off)) if causal else Tk  # keys the chunk's last row sees
            if n_keys == 0:
                continue
            # Keys [0, lo) are seen by every row of the chunk (row r0 + i sees keys <= r0 + i
            # + off); keys [lo, n_keys) by some, a triangle.
            lo = max(0, min(n_keys, r0 + off)) if causal else n_keys
            # GQA without copying k: the G query heads of a kv head (h = kv·G + g, as
            # repeat_interleave lays them out) are stacked along the row axis and share one
            # matmul with their k.
            qg = qc.view(b, Hkv, -1, hs)
            hidden = ~mb[:, :, r0:r1] if mb is not None else None
            if lo > 0:
                _extremes(qg @ kt[..., :lo], b, H, hidden, 0, lo, tops, bottoms)
            if lo < n_keys and not diagonal:
                tri = qg @ kt[..., lo:n_keys]  # (b, Hkv, G·c, n_keys - lo)
                # Hidden logits become 0, which never beats a max of magnitudes.
                tri.view(b, H, r1 - r0, n_keys - lo).tril_(r0 + off - lo)
                _extremes(tri, b, H, hidden, lo, n_keys, tops, bottoms)
    # The scale is positive, so it scales the max: applied once, by the caller, in fp32.
    if tops:  # max |x| as max(max, -min)
        absmax = torch.maximum(_cat(tops).amax(0), _cat(bottoms).amin(0).neg_()).float()
    else:
        absmax = torch.zeros(H, device=q.device)
    return _Pass(absmax, _norm(q_norm), _norm(k_norm))


def _diagonal_extremes(q: torch.Tensor, k: torch.Tensor, c: int, tops: list, bottoms: list) -> None:
    """Append the (b, H) max and min of q·k over the causal triangles where query chunk i
    (rows [i·c, (i+1)·c)) meets the same keys, for q (b, H, T, hs) and contiguous k
    (b, Hkv, T, hs), T = n·c; hidden logits read 0."""
    b, H, T, hs = q.shape
    Hkv, n = k.size(1), T // c
    G = H // Hkv
    # (b·Hkv·n, G·c, hs): the G heads of a kv head stacked per chunk (a copy when G > 1).
    qd = q.reshape(b, Hkv, G, n, c, hs).transpose(2, 3).reshape(b * Hkv * n, G * c, hs)
    tri = torch.bmm(qd, k.view(b * Hkv * n, c, hs).transpose(1, 2))  # (b·Hkv·n, G·c, c)
    tri.view(-1, c, c).tril_()
    per = tri.view(b, Hkv, n, G, c * c)
    tops.append(per.amax(-1).amax(2).view(b, H))  # (b, Hkv, G): h = kv·G + g
    bottoms.append(per.amin(-1).amin(2).view(b, H))


def _sampled_entropy(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: Sequence[int],
    n_batch: int,
    scale: float,
    causal: bool,
    mask: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropies of the softmax of ``scale``·q·k of query ``rows`` of the first ``n_batch``
    batch items, (n_batch, H, R) nats, and the keys each row may attend (n_batch|1, H|1, R).

    A matmul of the sampled rows alone, in chunks of rows of at most ``budget`` logits: for
    most models one matmul and one exp pass, where reading the rows out of the maximum's
    chunks took a pass per chunk (measured ~0.3 ms a layer more on the CPU)."""
    H, hs = q.size(1), q.size(3)
    Hkv, Tk = k.size(1), k.size(2)
    off = Tk - q.size(2)
    dtype = _matmul_dtype(q)
    if mask is not None:
        mask = _may_attend(mask)
        mask = mask[:n_batch] if mask.size(0) > 1 else mask
    qs = q[:n_batch].index_select(2, _index(rows, q.device)).to(dtype)  # (nb, H, R, hs)
    kt = k[:n_batch].to(dtype).transpose(-2, -1)  # (nb, Hkv, hs, Tk)
    per = max(1, budget // (n_batch * H * Tk))
    ents, keys = [], []
    for i in range(0, len(rows), per):
        part = rows[i : i + per]
        # The keys the chunk's last row sees (at least one: rows that see none read 0).
        n = max(1, min(Tk, part[-1] + off + 1)) if causal else Tk
        qc = _bmm_ready(qs[:, :, i : i + len(part)], H // Hkv)
        att = qc.view(n_batch, Hkv, -1, hs) @ kt[..., :n]  # (nb, Hkv, G·r, n)
        ent, n_keys = _entropy(att.view(n_batch, H, len(part), n), scale, part, off, causal, mask)
        ents.append(ent)
        keys.append(n_keys)
    if len(ents) == 1:
        return ents[0], keys[0]
    return torch.cat(ents, 2), torch.cat(keys, -1)


def _extremes(
    att: torch.Tensor,
    b: int,
    H: int,
    hidden: torch.Tensor | None,
    k0: int,
    k1: int,
    tops: list[torch.Tensor],
    bottoms: list[torch.Tensor],
) -> None:
    """Append the (b, H) max and min of a chunk's products (b, Hkv, G·c, k1 - k0) of keys
    [k0, k1); ``hidden``: (b|1, 1|H, c, all keys) True where a row may not attend, zeroed
    first (0 never beats a max of magnitudes)."""
    if hidden is not None:
        att.view(b, H, -1, k1 - k0).masked_fill_(hidden[..., k0:k1], 0.0)
    # Two vectorised reads over each head's contiguous run: abs-max reductions (the inf-norm)
    # are ~40x slower on the CPU, and aminmax ~10x.
    flat = att.view(b, H, -1)
    tops.append(flat.amax(-1))
    bottoms.append(flat.amin(-1))


def _entropy(
    att: torch.Tensor,
    scale: float,
    rows: Sequence[int],
    off: int,
    causal: bool,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy in nats of the softmax of ``scale``·``att``, the raw q·k (b, H, R, n) of query
    ``rows`` over the first n keys (keys a row may not attend hold anything): (b, H, R), and
    the keys each row may attend (b|1, H|1, R)."""
    n = att.size(-1)
    allowed, bias, n_keys = _causal(rows, off, n, causal, att.device)  # (1, 1, R, n), (1, 1, R)
    # In base 2: exp2 runs ~3x faster than exp on the CPU (which MKL's exp serves there), and
    # log2(e) folds into the scale.
    scale2 = scale * _LOG2E
    if mask is not None:
        allowed = allowed & mask[..., :n].index_select(-2, _index(rows, att.device))
        n_keys = allowed.sum(-1)
        att = att.float().mul_(scale2).masked_fill_(~allowed, float("-inf"))
    else:  # scaled and masked in one pass: an add of 0/-inf is ~4x faster than masked_fill
        att = torch.add(bias, att.float(), alpha=scale2)  # (b, H, R, n)
    row_max = att.amax(dim=-1, keepdim=True)  # (b, H, R, 1)
    if mask is not None or off < 0:  # rows that may attend nothing: -inf - -inf is NaN
        row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    # One exp pass: with d = a - max (in bits), p = 2^d / s and H = ln 2 · (log2 s - sum(2^d ·
    # d) / s). Clamping d at -115 (e^-80) keeps exp2 off its slow subnormal path (2^-115 ~
    # 1e-35: no effect on H) and turns masked -inf into terms that vanish instead of 0 · -inf.
    d = att.sub_(row_max).clamp_(min=-115.0)
    e = d.exp2()
    s = e.sum(-1)  # (b, H, R)
    return (s.log2() - e.mul_(d).sum(-1) / s) * _LN2, n_keys


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
    over all batch items and query rows, in chunks (``attn_logit_absmax``). Only the averages
    are sampled: entropies are over ``sample_rows`` evenly spaced query rows (all when Tq <=
    it) of the first ``sample_batch`` batch items (all when None), from a matmul of those rows
    (bf16 on an accelerator, as the maximum), leaving out rows with fewer than two keys
    (their entropy is 0 by construction);
    entropy_min/mean are the min/mean over heads of each head's mean entropy. q/k RMS are over
    everything. ``mask``: as in attn_logit_absmax.
    """
    B, Tq = q.size(0), q.size(2)
    Bs = B if sample_batch is None else min(B, sample_batch)
    budget = chunk_budget(q.device, chunk_elems)
    rows = _cached(("spaced", Tq, sample_rows), lambda: spaced(Tq, sample_rows))
    found = _attn_pass(q, k, causal, mask, budget)
    # (Bs, H, R) nats, (Bs|1, H|1, R) keys
    ent, n_keys = _sampled_entropy(q, k, rows, Bs, scale, causal, mask, budget)
    if mask is None:  # the weights depend on the rows alone: made once
        w, w_log = _cached(
            ("entropy weights", rows, k.size(2) - Tq, k.size(2), causal, q.device),
            lambda: _weights(n_keys.view(-1)),
        )
        per_head = ent.sum(0) @ w / Bs  # (H,)
        frac = ent.sum((0, 1)) @ w_log / (Bs * q.size(1))
    else:
        w = (n_keys >= 2).float().expand_as(ent)  # rows with one key have entropy 0
        per_head = (ent * w).sum((0, 2)) / w.sum((0, 2)).clamp_min(1.0)  # (H,)
        frac = (ent / n_keys.clamp_min(2).float().log() * w).sum() / w.sum().clamp_min(1.0)
    tail = [
        per_head.min(),
        per_head.mean(),
        frac,
        found.q_norm / math.sqrt(max(q.numel(), 1)),
        found.k_norm / math.sqrt(max(k.numel(), 1)),
    ]
    return torch.cat([found.absmax * scale, torch.stack(tail)])


def _weights(n_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sampled row's weight in the per-head mean entropy (rows with fewer than two keys
    have entropy 0 by construction: left out), and that weight over the row's log(keys), for
    entropy_frac; both normalised to sum to 1 (R,)."""
    w = (n_keys >= 2).float()
    total = w.sum().clamp_min(1.0)
    return w / total, w / n_keys.clamp_min(2).float().log() / total


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
    nonfinite = rows.numel() - torch.isfinite(rows).sum().float()
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
