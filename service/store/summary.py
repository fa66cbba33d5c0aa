"""Block summaries of merged chunks, and the bucket grid they answer: long bucketed reads
sum a few bytes per block instead of decoding every point.

A chunk's block k holds its points with steps in [k * 2**level, (k+1) * 2**level); each block
keeps its first and last step, count, NaN count, min, max (NaN skipped, as in read.py), first
and last value. A bucket grid whose origin and width are multiples of 2**level never cuts a
block, so buckets summed from blocks are exactly what the points give: every one-step spike,
NaN and inf stays visible.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BLOCK_POINTS",
    "MIN_LEVEL",
    "bucketize",
    "combine",
    "grid",
    "summarize",
    "unpack",
]

#: About this many points a block: ~1 byte a point stored, 64x fewer rows to sum on a read.
BLOCK_POINTS = 64
#: Blocks span at least 2**MIN_LEVEL steps; bucket grids finer than that read the points.
MIN_LEVEL = 6
#: The grid's granularity is at most an eighth of the bucket width, so snapping the buckets
#: to it widens them by less than 1/8 (at most max_points buckets, never more).
_SNAP = 8
_COLUMNS = (
    ("steps", "<i8"),  # first step of the block
    ("last_steps", "<i8"),
    ("count", "<i4"),
    ("nan", "<i4"),
    ("min", "<f8"),
    ("max", "<f8"),
    ("first", "<f8"),
    ("last", "<f8"),
)
_BYTES = sum(np.dtype(t).itemsize for _, t in _COLUMNS)


def grid(lo: int, hi: int, max_points: int) -> tuple[int, int, int]:
    """(origin, width, granularity) of at most max_points buckets covering [lo, hi].

    Width ceil((hi - lo + 1) / max_points) from lo when buckets are narrower than
    _SNAP * 2**MIN_LEVEL steps (granularity 1). Wider ones snap origin and width to the
    largest power of two at most width / 8, so that summary blocks fall inside one bucket.
    """
    width = max(1, -(-(hi - lo + 1) // max_points))
    g = 1 << max(0, (width // _SNAP).bit_length() - 1)
    if g < 1 << MIN_LEVEL:
        return lo, width, 1
    origin = lo - lo % g
    width = max(1, -(-(hi - origin + 1) // max_points))
    return origin, -(-width // g) * g, g


def bucketize(
    steps: np.ndarray,
    values: np.ndarray,
    max_points: int,
    lo: int | None = None,
    hi: int | None = None,
) -> dict[str, np.ndarray]:
    """Buckets of ascending `steps` on the grid of [lo, hi] (default: the data's step range)."""
    if len(steps) == 0:
        return _empty()
    lo = int(steps[0]) if lo is None else lo
    hi = int(steps[-1]) if hi is None else hi
    origin, width, _ = grid(lo, hi, max_points)
    # Bucket edges located by binary search: O(buckets * log n), no pass over the steps.
    edges = np.searchsorted(steps, origin + width * np.arange(max_points + 1, dtype=np.int64))
    starts = edges[:-1][edges[:-1] < edges[1:]]  # non-empty buckets only
    ends = np.append(starts[1:], edges[-1])
    nan = np.isnan(values)
    counts = (
        np.add.reduceat(nan, starts, dtype=np.int64)
        if nan.any()
        else np.zeros(len(starts), dtype=np.int64)
    )
    return {
        "steps": steps[starts],
        "last_steps": steps[ends - 1],
        "count": ends - starts,
        "nan": counts,
        "min": np.fmin.reduceat(values, starts),
        "max": np.fmax.reduceat(values, starts),
        "first": values[starts],
        "last": values[ends - 1],
    }


def summarize(steps: np.ndarray, values: np.ndarray) -> tuple[int, bytes]:
    """(level, packed blocks) of a chunk's ascending steps and their values."""
    span = int(steps[-1]) - int(steps[0]) + 1
    level = max(MIN_LEVEL, int(np.log2(BLOCK_POINTS * span / len(steps))))
    block = steps >> level
    starts = np.flatnonzero(np.concatenate(([True], block[1:] != block[:-1])))
    ends = np.append(starts[1:], len(steps))
    cols = {
        "steps": steps[starts],
        "last_steps": steps[ends - 1],
        "count": ends - starts,
        "nan": np.add.reduceat(np.isnan(values), starts, dtype=np.int64),
        "min": np.fmin.reduceat(values, starts),
        "max": np.fmax.reduceat(values, starts),
        "first": values[starts],
        "last": values[ends - 1],
    }
    return level, b"".join(np.asarray(cols[k], dtype=t).tobytes() for k, t in _COLUMNS)


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    """The columns summarize() packed, widened to int64/float64."""
    n = len(blob) // _BYTES
    out, offset = {}, 0
    for key, kind in _COLUMNS:
        dtype = np.dtype(kind)
        col = np.frombuffer(blob, dtype=dtype, count=n, offset=offset)
        out[key] = col.astype(np.int64 if dtype.kind == "i" else np.float64)
        offset += n * dtype.itemsize
    return out


def combine(parts: list[dict[str, np.ndarray]], origin: int, width: int) -> dict:
    """Buckets of the grid from partial buckets or blocks that share no step and never
    straddle a bucket edge (each part's arrays in step order)."""
    parts = [p for p in parts if len(p["steps"])]
    if not parts:
        return _empty()
    cols = {k: np.concatenate([p[k] for p in parts]) for k, _ in _COLUMNS}
    if len(parts) > 1:
        order = np.argsort(cols["steps"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
    bucket = (cols["steps"] - origin) // width
    starts = np.flatnonzero(np.concatenate(([True], bucket[1:] != bucket[:-1])))
    ends = np.append(starts[1:], len(bucket))
    return {
        "steps": cols["steps"][starts],
        "last_steps": cols["last_steps"][ends - 1],
        "count": np.add.reduceat(cols["count"], starts),
        "nan": np.add.reduceat(cols["nan"], starts),
        "min": np.fmin.reduceat(cols["min"], starts),
        "max": np.fmax.reduceat(cols["max"], starts),
        "first": cols["first"][starts],
        "last": cols["last"][ends - 1],
    }


def _empty() -> dict[str, np.ndarray]:
    return {k: np.empty(0, dtype=np.int64 if t[1] == "i" else np.float64) for k, t in _COLUMNS}
