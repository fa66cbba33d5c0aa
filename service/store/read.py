"""Reading a metric back: chunks decoded with numpy, the newest segment per step, buckets or pages.

Buckets (max_points given) cut the step range into at most max_points equal step widths
(summary.grid: wide buckets snap to a power-of-two grid) and give, for each non-empty bucket,
its first and last step, count, min, max, first and last value, and the number of NaN in it.
min/max skip NaN (np.fmin/np.fmax) so a spike next to a NaN still shows, and ``nan`` > 0 says
the bucket held one: a NaN is never averaged away. Merged chunks that the grid does not cut
answer from their block summaries (summary.py), the rest from their points: the same buckets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from logitwatch.service.store import reports
from logitwatch.service.store.codec import decode_floats, decode_steps, pg_array
from logitwatch.service.store.models import Chunk, ChunkSummary, Run, Series
from logitwatch.service.store.sql import is_pg
from logitwatch.service.store.summary import bucketize, combine, grid, unpack

__all__ = [
    "Buckets",
    "Points",
    "ReadResult",
    "bucketize",
    "merge_parts",
    "read_points",
    "snapshot",
]

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


def snapshot(session: Session) -> None:
    """Make the session's next transaction read one snapshot: REPEATABLE READ on PostgreSQL
    (a session that only reads; call it before its first statement). SQLite's read
    transactions see one snapshot already (WAL)."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})


def _chunks(
    session: Session,
    run_id: int,
    sids: list[int],
    start: int | None,
    end: int | None,
    want_times: bool,
):
    """Yield (series id, [(segment, steps, values, times)]) for each of `sids` in order, the
    parts in write order (segment, then chunk id, then the run's reports); one query for all
    series, read lazily.

    The reports are read first: a flush (reports.flush) between the two statements then
    shows its points twice, equal, rather than not at all."""
    pending = reports.parts(session, run_id, sids, start, end, want_times)
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
        if sid in pending:
            parts = sorted(parts + pending[sid], key=lambda p: p[0])  # stable: reports last
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


@dataclass(slots=True)
class _Chunk:
    """A chunk as a bucketed read sees it: where it lies, its summary (if the compactor made
    one) and its points (fetched only where no summary answers)."""

    id: int
    segment: int
    step_min: int
    step_max: int
    n: int
    level: int | None
    blocks: bytes | None
    points: tuple[np.ndarray, np.ndarray] | None


def _decode(pg: bool, step_min: int, n: int, steps, values) -> tuple[np.ndarray, np.ndarray]:
    if pg:
        return pg_array(steps, "i8"), pg_array(values, "f8")
    return decode_steps(steps, step_min, n), decode_floats(values, n)


def _bucket_chunks(
    session: Session, sids: list[int], start, end, *, all_points: bool, run_id: int | None = None
):
    """{series id: [_Chunk]} in write order; points only of chunks without a summary (or of
    all when all_points). One statement, so one consistent view of the chunks; the reports of
    run_id (read first, see _chunks) come last in each segment, as chunks with ids below 0."""
    pending = {} if run_id is None else reports.parts(session, run_id, sids, start, end, False)
    c, s = Chunk.__table__.c, ChunkSummary.__table__.c
    pg = is_pg(session)
    payload = [c.steps, c["values"]]
    if not all_points:
        payload = [case((s.chunk_id.is_(None), col)) for col in payload]
    if pg:
        payload = [func.array_send(col) for col in payload]
    q = (
        select(c.id, c.series_id, c.segment, c.step_min, c.step_max, c.n, s.level, s.blocks)
        .add_columns(*payload)
        .select_from(Chunk.__table__.outerjoin(ChunkSummary.__table__, s.chunk_id == c.id))
        .where(c.series_id.in_(sids))
    )
    if start is not None:
        q = q.where(c.step_max >= start)
    if end is not None:
        q = q.where(c.step_min <= end)
    out: dict[int, list[_Chunk]] = {sid: [] for sid in sids}
    for cid, sid, seg, lo, hi, n, level, blocks, steps, values in session.execute(
        q.order_by(c.series_id, c.segment, c.id)
    ):
        points = _decode(pg, lo, n, steps, values) if all_points or level is None else None
        out[sid].append(_Chunk(cid, seg, lo, hi, n, level, blocks, points))
    fake_id = 0
    for sid, parts in pending.items():
        for seg, steps, values, _ in parts:
            fake_id -= 1
            lo, hi = int(steps[0]), int(steps[-1])
            out[sid].append(_Chunk(fake_id, seg, lo, hi, len(steps), None, None, (steps, values)))
        out[sid].sort(key=lambda ch: ch.segment)  # stable: reports last in their segment
    return out


def _points_of(session: Session, chunks: list[_Chunk]) -> dict | None:
    """{id: (steps, values)} of `chunks`; None if any was replaced since it was listed."""
    c = Chunk.__table__.c
    pg = is_pg(session)
    payload = [c.steps, c["values"]]
    if pg:
        payload = [func.array_send(col) for col in payload]
    wanted = {ch.id: ch for ch in chunks}
    q = select(c.id, c.segment, c.step_min, c.step_max, c.n, *payload).where(c.id.in_(wanted))
    out = {}
    for cid, seg, lo, hi, n, steps, values in session.execute(q):
        ch = wanted[cid]
        if (ch.segment, ch.step_min, ch.step_max, ch.n) != (seg, lo, hi, n):
            return None
        out[cid] = _decode(pg, lo, n, steps, values)
    return out if len(out) == len(wanted) else None


@dataclass(slots=True)
class _Plan:
    """How one series (or one segment of it) is bucketed: the grid, which chunks answer from
    their summaries, and which from their points."""

    lo: int
    hi: int
    origin: int
    width: int
    summarized: list[_Chunk]
    raw: list[_Chunk]


def _plan(chunks: list[_Chunk], start, end, max_points: int) -> _Plan | None:
    if not chunks:
        return None
    lo = min(ch.step_min for ch in chunks) if start is None else start
    hi = max(ch.step_max for ch in chunks) if end is None else end
    if lo > hi:
        return None
    origin, width, g = grid(lo, hi, max_points)
    # A summary answers for a chunk that shares no step with another (so no newer write
    # overrides any of its points), lies inside [lo, hi], and whose blocks the grid holds whole.
    by_start = sorted(chunks, key=lambda ch: (ch.step_min, ch.step_max))
    alone, reach = set(), None
    for i, ch in enumerate(by_start):
        after_prev = reach is None or ch.step_min > reach
        before_next = i + 1 == len(by_start) or by_start[i + 1].step_min > ch.step_max
        if after_prev and before_next:
            alone.add(ch.id)
        reach = ch.step_max if reach is None else max(reach, ch.step_max)
    summarized, raw = [], []
    for ch in chunks:
        fits = ch.level is not None and g >= 1 << ch.level
        inside = lo <= ch.step_min and ch.step_max <= hi
        (summarized if ch.id in alone and fits and inside else raw).append(ch)
    return _Plan(lo, hi, origin, width, summarized, raw)


def _read_buckets(
    session: Session, run_id: int, sids: list[int], start, end, max_points: int, by_segment
):
    """Yield (series id, segment or None, bucket columns): every series when not by_segment
    (empty columns for one with no points in range), else each segment that has points."""
    for all_points in (False, True):
        chunks = _bucket_chunks(session, sids, start, end, all_points=all_points, run_id=run_id)
        groups = []
        for sid in sids:
            if by_segment:
                segs = sorted({ch.segment for ch in chunks[sid]})
                groups += [(sid, g, [ch for ch in chunks[sid] if ch.segment == g]) for g in segs]
            else:
                groups.append((sid, None, chunks[sid]))
        plans = [(sid, seg, _plan(group, start, end, max_points)) for sid, seg, group in groups]
        missing = [ch for _, _, p in plans if p for ch in p.raw if ch.points is None]
        fetched = _points_of(session, missing) if missing else {}
        if fetched is not None:
            break
        # A compaction replaced some of them meanwhile: read everything in one statement.
    for ch in missing:
        ch.points = fetched[ch.id]
    for sid, seg, plan in plans:
        if plan is None:
            yield sid, seg, bucketize(_EMPTY_I, _EMPTY_F, max_points)
            continue
        parts = [unpack(ch.blocks) for ch in plan.summarized]
        if plan.raw:
            merged = merge_parts([(ch.segment, *ch.points, _EMPTY_F) for ch in plan.raw])
            st, va, _ = _clip(*merged, start, end)
            parts.append(bucketize(st, va, max_points, plan.lo, plan.hi))
        yield sid, seg, combine(parts, plan.origin, plan.width)


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
    if max_points is not None:
        buckets = _read_buckets(session, run_id, sids, start, end, max_points, segments_all)
        for sid, seg, b in buckets:
            if after and (sid, -1 if seg is None else seg) < after[:2]:
                continue
            result.series.append(Buckets(sid, metric, labels_of[sid], seg, **b))
        return result
    for sid, parts in _chunks(session, run_id, sids, start, end, times):
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
