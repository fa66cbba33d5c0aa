"""Reading a metric back: chunks decoded with numpy, the newest segment per step, buckets or pages.

Buckets (max_points given) cut the step range into max_points equal step widths and give,
for each non-empty bucket, its first and last step, count, min, max, first and last value,
and the number of NaN in it. min/max skip NaN (np.fmin/np.fmax) so a spike next to a NaN
still shows, and ``nan`` > 0 says the bucket held one: a NaN is never averaged away.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from logitwatch.service.store.codec import decode_floats, decode_steps, pg_array
from logitwatch.service.store.models import Chunk, Run, Series
from logitwatch.service.store.sql import is_pg

__all__ = ["Buckets", "Points", "ReadResult", "bucketize", "merge_parts", "read_points"]

DEFAULT_LIMIT = 100_000
_EMPTY_I = np.empty(0, dtype=np.int64)
_EMPTY_F = np.empty(0, dtype=np.float64)


@dataclass(slots=True)
class Points:
    """Every point of one series (segment None: the newest segment's value per step)."""

    series_id: int
    metric: str
    labels: dict[str, str]
    segment: int | None
    steps: np.ndarray
    values: np.ndarray
    times: np.ndarray  # empty when the client sent no times


@dataclass(slots=True)
class Buckets:
    series_id: int
    metric: str
    labels: dict[str, str]
    segment: int | None
    steps: np.ndarray  # first step of each bucket
    last_steps: np.ndarray
    count: np.ndarray
    min: np.ndarray
    max: np.ndarray
    first: np.ndarray
    last: np.ndarray
    nan: np.ndarray


@dataclass(slots=True)
class ReadResult:
    series: list[Points | Buckets] = field(default_factory=list)
    #: Pass back as `cursor` for the next page; None on the last page (and for buckets).
    next_cursor: str | None = None


def bucketize(
    steps: np.ndarray,
    values: np.ndarray,
    max_points: int,
    lo: int | None = None,
    hi: int | None = None,
) -> dict[str, np.ndarray]:
    """Cut [lo, hi] (default: the data's step range) into max_points equal step widths."""
    n = len(steps)
    if n == 0:
        z = _EMPTY_I
        return {k: z for k in ("steps", "last_steps", "count", "nan")} | {
            k: _EMPTY_F for k in ("min", "max", "first", "last")
        }
    lo = int(steps[0]) if lo is None else lo
    hi = int(steps[-1]) if hi is None else hi
    width = max(1, -(-(hi - lo + 1) // max_points))
    # Bucket edges located by binary search: O(buckets * log n), no pass over the steps.
    edges = np.searchsorted(steps, lo + width * np.arange(max_points + 1, dtype=np.int64))
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
        "min": np.fmin.reduceat(values, starts),
        "max": np.fmax.reduceat(values, starts),
        "first": values[starts],
        "last": values[ends - 1],
        "nan": counts,
    }


def _chunks(
    session: Session, sids: list[int], start: int | None, end: int | None, want_times: bool
):
    """Yield (series id, [(segment, steps, values, times)]) for each of `sids` in order, the
    parts in write order (segment, then chunk id); one query for all series, read lazily."""
    c = Chunk.__table__.c
    pg = is_pg(session)
    payload = [c.steps, c["values"], c.times] if want_times else [c.steps, c["values"]]
    if pg:  # binary arrays, parsed by numpy (codec.pg_array)
        payload = [func.array_send(col) for col in payload]
    q = select(c.series_id, c.segment, c.step_min, c.n, *payload).where(c.series_id.in_(sids))
    if start is not None:
        q = q.where(c.step_max >= start)
    if end is not None:
        q = q.where(c.step_min <= end)
    rows = iter(session.execute(q.order_by(c.series_id, c.segment, c.id)))
    row = next(rows, None)
    for sid in sids:
        parts = []
        while row is not None and row[0] == sid:
            seg, step_min, n = row[1], row[2], row[3]
            if pg:
                steps, values = pg_array(row[4], "i8"), pg_array(row[5], "f8")
                times = pg_array(row[6], "f8") if want_times else _EMPTY_F
            else:
                steps, values = decode_steps(row[4], step_min, n), decode_floats(row[5], n)
                times = decode_floats(row[6], n) if want_times else _EMPTY_F
            parts.append((seg, steps, values, times))
            row = next(rows, None)
        yield sid, parts


def merge_parts(parts: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One value per step from [(segment, steps, values, times)]; among equal steps the
    last part in `parts` wins. Times are NaN where a part had none (if any part had some)."""
    if not parts:
        return _EMPTY_I, _EMPTY_F, _EMPTY_F
    if len(parts) == 1:
        return parts[0][1], parts[0][2], parts[0][3]
    if any(len(p[3]) for p in parts) and not all(len(p[3]) == len(p[1]) for p in parts):
        parts = [
            p if len(p[3]) == len(p[1]) else (*p[:3], np.full(len(p[1]), np.nan)) for p in parts
        ]
    has_times = len(parts[0][3]) > 0
    by_start = sorted(parts, key=lambda p: p[1][0])
    # Fast path: chunks that do not overlap are concatenated in step order.
    if all(a[1][-1] < b[1][0] for a, b in itertools.pairwise(by_start)):
        steps = np.concatenate([p[1] for p in by_start])
        values = np.concatenate([p[2] for p in by_start])
        times = np.concatenate([p[3] for p in by_start]) if has_times else _EMPTY_F
        return steps, values, times
    steps = np.concatenate([p[1] for p in parts])
    order = np.argsort(steps, kind="stable")
    steps = steps[order]
    keep = np.append(steps[1:] != steps[:-1], True)
    values = np.concatenate([p[2] for p in parts])[order][keep]
    times = np.concatenate([p[3] for p in parts])[order][keep] if has_times else _EMPTY_F
    return steps[keep], values, times


def _clip(steps, values, times, start, end):
    i = 0 if start is None else int(np.searchsorted(steps, start, "left"))
    j = len(steps) if end is None else int(np.searchsorted(steps, end, "right"))
    if i == 0 and j == len(steps):
        return steps, values, times
    return steps[i:j], values[i:j], times[i:j] if len(times) else times


def _parse_cursor(cursor: str | None) -> tuple[int, int, int] | None:
    if not cursor:
        return None
    try:
        sid, seg, step = (int(x) for x in cursor.split(":"))
    except ValueError:
        raise ValueError("cursor: not a cursor returned by this endpoint") from None
    return sid, seg, step


def read_points(
    session: Session,
    *,
    run: str,
    metric: str,
    labels: dict[str, str] | None = None,
    start: int | None = None,
    end: int | None = None,
    max_points: int | None = None,
    segments_all: bool = False,
    limit: int | None = None,
    cursor: str | None = None,
    times: bool = True,
) -> ReadResult | None:
    """Points of `metric` in `run` whose labels match `labels`; None if the run is unknown."""
    run_id = session.scalar(select(Run.id).where(Run.name == run))
    if run_id is None:
        return None
    rows = session.execute(
        select(Series.id, Series.labels)
        .where(Series.run_id == run_id, Series.metric == metric)
        .order_by(Series.id)
    ).all()
    want = {k: str(v) for k, v in (labels or {}).items()}
    matched = [(sid, lab) for sid, lab in rows if all(lab.get(k) == v for k, v in want.items())]
    result = ReadResult()
    budget = limit or DEFAULT_LIMIT
    after = _parse_cursor(cursor)
    if after:
        matched = [(sid, lab) for sid, lab in matched if sid >= after[0]]
    labels_of = dict(matched)
    sids = sorted(labels_of)
    for sid, parts in _chunks(session, sids, start, end, times and max_points is None):
        lab = labels_of[sid]
        groups: list[tuple[int | None, list]] = (
            [(seg, [p for p in parts if p[0] == seg]) for seg in sorted({p[0] for p in parts})]
            if segments_all
            else [(None, parts)]
        )
        for seg, group in groups:
            key = -1 if seg is None else seg
            if after and (sid, key) < after[:2]:
                continue
            st, va, ti = _clip(*merge_parts(group), start, end)
            if max_points is not None:
                b = bucketize(st, va, max_points, start, end)
                result.series.append(Buckets(sid, metric, lab, seg, **b))
                continue
            if after and (sid, key) == after[:2]:
                i = int(np.searchsorted(st, after[2], "right"))
                st, va, ti = st[i:], va[i:], ti[i:] if len(ti) else ti
            if budget <= 0:
                result.next_cursor = f"{sid}:{key}:{int(st[0]) - 1}" if len(st) else None
                if result.next_cursor:
                    return result
                continue
            if len(st) > budget:
                st, va, ti = st[:budget], va[:budget], ti[:budget] if len(ti) else ti
                result.series.append(Points(sid, metric, lab, seg, st, va, ti))
                result.next_cursor = f"{sid}:{key}:{int(st[-1])}"
                return result
            budget -= len(st)
            result.series.append(Points(sid, metric, lab, seg, st, va, ti))
    return result
