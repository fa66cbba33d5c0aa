"""Reports: a batch of one point per series (a training step's report) as one row.

A fleet run posts one point for each of a few hundred series per step. Stored as chunks, each
point was a row of its own: a row and an index entry to write (~5 us on SQLite, most of a
report's storing), then to read, delete and merge again when the compactor made a bigger
chunk of it. A report is one row of ``reports`` instead: the ids of its series (ascending)
and their steps, values and times, position by position. ``flush`` turns a run's reports
into chunks, one per series and segment holding all their points; the Compactor does it
once a run has 16 to FLUSH_REPORTS of them (and when ingest goes quiet), so a run keeps a
few dozen at most. The flush also writes those series' latest rows (latest.py), which readers
bring up to date with ``pending_latest``.

Order: a run's reports are newer than all of its chunks. Ingest flushes a run's reports
before it writes a chunk of that run (ingest.ingest_batch), a flush writes the chunks with
new, larger ids, and the compactor's merges keep the ids of the chunks they replace. Reads
(read.py) therefore put the points of reports after the chunks of their segment, and among
reports the later row wins a step sent twice.

Encoding on SQLite: series_ids and steps raw little-endian int64, values and times raw
little-endian float64 (times b"" when the client sent none). PostgreSQL: int8[] and float8[]
(the Grafana function logitwatch_points unnests them, migration 0007).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from logitwatch.service.store import latest
from logitwatch.service.store.codec import pg_array, pg_array_bytes, raw_floats, raw_steps
from logitwatch.service.store.deferred import defer, pg_cursor
from logitwatch.service.store.models import Report
from logitwatch.service.store.sql import (
    PgArray,
    PgInt8Array,
    insert_chunks,
    is_pg,
    pg_arrays,
)

__all__ = [
    "FLUSH_REPORTS",
    "flush",
    "parts",
    "pending_latest",
    "pending_points",
    "pending_runs",
    "pending_values",
    "write",
]

#: Reports of a run that make the Compactor flush them into chunks: the chunks then hold
#: this many points each, and a read goes through at most about this many report rows.
FLUSH_REPORTS = 32

_R = Report.__table__.c
_I8 = np.dtype("<i8")
_F8 = np.dtype("<f8")
_F4 = np.dtype("<f4")
_EMPTY_F = np.empty(0, dtype=np.float64)

_COLS = 'run_id, segment, step_min, step_max, n, series_ids, steps, "values", times'
_SQLITE_INSERT = f"INSERT INTO reports ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_PG_INSERT = f"INSERT INTO reports ({_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"


def write(
    session: Session,
    run_id: int,
    segment: int,
    ids: list[int],
    steps: np.ndarray,
    values: np.ndarray,
    times: np.ndarray,
) -> None:
    """Store one report: series ids[i] has the point (steps[i], values[i], times[i]); times
    is empty when the client sent none. ids are distinct."""
    sids = np.asarray(ids, dtype=np.int64)
    if len(sids) > 1 and not (sids[1:] > sids[:-1]).all():
        order = np.argsort(sids, kind="stable")
        sids, steps, values = sids[order], steps[order], values[order]
        times = times[order] if len(times) else times
    lo, hi = int(steps.min()), int(steps.max())
    if is_pg(session):
        args = (
            PgInt8Array(pg_array_bytes(sids, "i8")),
            PgInt8Array(pg_array_bytes(steps, "i8")),
            PgArray(pg_array_bytes(values, "f8")),
            PgArray(pg_array_bytes(times, "f8")),
        )
        defer(session, _PG_INSERT, (run_id, segment, lo, hi, len(sids), *args))
        return
    raw = session.connection().connection.driver_connection
    args = (
        sids.astype(_I8, copy=False).tobytes(),
        _one_or_all(steps.astype(_I8, copy=False)),
        _narrow(values.astype(_F8, copy=False)),
        _one_or_all(times.astype(_F8, copy=False)),
    )
    raw.execute(_SQLITE_INSERT, (run_id, segment, lo, hi, len(sids), *args))


# SQLite's rows hold what comes back exactly in fewer bytes where it can: a report's series
# share their step and, from the agent, their time (one 8-byte value for all), and values
# that are all float32 numbers (the agent's device metrics) take 4 bytes each. A fleet
# report's row: 6.4 -> 2.4 KB. The column's length says which (n series: sids are 8n bytes).


def _one_or_all(a: np.ndarray) -> bytes:
    """8 bytes when every item of ``a`` (two or more) has the same 8 bytes, else all."""
    bits = a.view(_I8)
    if len(bits) > 1 and (bits == bits[0]).all():
        return a[:1].tobytes()
    return a.tobytes()


def _narrow(values: np.ndarray) -> bytes:
    """float32 bytes when each value is a float32 number (NaN and inf included), else float64."""
    with np.errstate(over="ignore"):
        f4 = values.astype(_F4)
    back = f4.astype(_F8)
    if ((back == values) | (np.isnan(back) & np.isnan(values))).all():
        return f4.tobytes()
    return values.tobytes()


def _wide(blob: bytes, n: int, dtype: np.dtype) -> np.ndarray:
    """What _one_or_all stored for n items."""
    if n > 1 and len(blob) == 8:
        return np.full(n, np.frombuffer(blob, dtype=dtype)[0], dtype=dtype.newbyteorder("="))
    return np.frombuffer(blob, dtype=dtype)


def _arrays(pg: bool, sids, steps, values, times) -> tuple[np.ndarray, ...]:
    """A row's four columns as numpy arrays (PostgreSQL's read through array_send)."""
    if pg:
        return (
            pg_array(sids, "i8"),
            pg_array(steps, "i8"),
            pg_array(values, "f8"),
            pg_array(times, "f8"),
        )
    ids = np.frombuffer(sids, dtype=_I8)
    n = len(ids)
    if len(values) == 4 * n:
        floats = np.frombuffer(values, dtype=_F4).astype(np.float64)
    else:
        floats = np.frombuffer(values, dtype=_F8)
    return (ids, _wide(steps, n, _I8), floats, _wide(times, n, _F8) if times else _EMPTY_F)


def _payload(pg: bool) -> list:
    cols = [_R.series_ids, _R.steps, _R["values"], _R.times]
    return [func.array_send(c) for c in cols] if pg else cols


_TAKE = "DELETE FROM reports WHERE run_id = {} RETURNING id, segment, {}"
_PG_TAKE = _TAKE.format(
    "%s", 'array_send(series_ids), array_send(steps), array_send("values"), array_send(times)'
)
_SQLITE_TAKE = _TAKE.format("?", 'series_ids, steps, "values", times')
_PG_LOCK_RUNS = (
    # COLLATE "C": byte order, which is the order of Python's str comparison (UTF-8).
    'SELECT id FROM runs WHERE id = ANY(%s) ORDER BY name COLLATE "C" FOR NO KEY UPDATE'
)


def flush(session: Session, run_ids: Iterable[int]) -> list[tuple[int, int]]:
    """Turn the reports of `run_ids` into chunks, one per series and segment; the
    (series id, segment) of each chunk written. Deletes exactly the rows it turns (DELETE
    ... RETURNING): a concurrent flush of the same run gets the other rows or none."""
    run_ids = sorted(set(run_ids))
    if not run_ids:
        return []
    pg = is_pg(session)
    rows = []
    if pg:
        with pg_cursor(session) as cur:
            # The runs' rows first, locked in name order: the order a group commit takes
            # them in (ingest.py), so a flush and an ingest never each hold what the other
            # waits for. A run deleted meanwhile has no reports left to take.
            cur.execute(_PG_LOCK_RUNS, (run_ids,))
            run_ids = [r[0] for r in cur.fetchall()]
            for run_id in run_ids:
                cur.execute(_PG_TAKE, (run_id,))
                rows += cur.fetchall()
    else:
        raw = session.connection().connection.driver_connection
        for run_id in run_ids:
            rows += raw.execute(_SQLITE_TAKE, (run_id,)).fetchall()
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])  # in write order
    arrays = [(r[1], *_arrays(pg, *r[2:])) for r in rows]
    newest = latest.newest(
        [(seg, sids, steps, values, times) for seg, sids, steps, values, times in arrays]
    )
    chunks, keys = [], []
    for seg in sorted({r[1] for r in rows}):
        group = [a[1:] for a in arrays if a[0] == seg]
        for sid, steps, values, times in _by_series(group):
            payload = (
                pg_arrays(steps, values, times)
                if pg
                else (raw_steps(steps), raw_floats(values), raw_floats(times))
            )
            chunks.append((sid, seg, int(steps[0]), int(steps[-1]), len(steps), *payload))
            keys.append((sid, seg))
    insert_chunks(session, chunks)
    latest.upsert(session, [(sid, *n) for sid, n in newest.items()], pg)
    return keys


def _by_series(rows: list[tuple[np.ndarray, ...]]):
    """(series id, steps, values, times) of each series in `rows` (one segment's reports in
    write order, as _arrays gives them), series ascending: steps ascending and unique, a
    step sent twice keeping the later row's value. Times NaN for the rows that had none, if
    any row had some."""
    sids = np.concatenate([r[0] for r in rows])
    if not len(sids):
        return
    steps = np.concatenate([r[1] for r in rows])
    values = np.concatenate([r[2] for r in rows])
    timed = [len(r[3]) > 0 for r in rows]
    if any(timed):
        times = np.concatenate(
            [r[3] if t else np.full(len(r[0]), np.nan) for r, t in zip(rows, timed, strict=True)]
        )
    else:
        times = _EMPTY_F
    order = np.repeat(np.arange(len(rows)), [len(r[0]) for r in rows])
    idx = np.lexsort((order, steps, sids))
    s, st = sids[idx], steps[idx]
    last = np.append((s[1:] != s[:-1]) | (st[1:] != st[:-1]), True)
    idx = idx[last]
    sids, steps, values = sids[idx], steps[idx], values[idx]
    times = times[idx] if len(times) else times
    bounds = [0, *(np.flatnonzero(sids[1:] != sids[:-1]) + 1).tolist(), len(sids)]
    for a, b in itertools.pairwise(bounds):
        yield (
            int(sids[a]),
            steps[a:b],
            values[a:b],
            times[a:b] if len(times) else times,
        )


def parts(
    session: Session,
    run_id: int,
    sids: list[int],
    start: int | None,
    end: int | None,
    want_times: bool,
) -> dict[int, list[tuple]]:
    """{series id: [(segment, steps, values, times)]}: the points that reports of `run_id`
    hold for `sids`, one part per segment (ascending), in read.merge_parts' form. A part may
    reach outside [start, end]: the reader clips, as it does chunks."""
    if not sids:
        return {}
    pg = is_pg(session)
    q = select(_R.segment, *_payload(pg)).where(_R.run_id == run_id)
    if start is not None:
        q = q.where(_R.step_max >= start)
    if end is not None:
        q = q.where(_R.step_min <= end)
    rows = session.execute(q.order_by(_R.segment, _R.id)).all()
    if not rows:
        return {}
    wanted = np.asarray(sorted(sids), dtype=np.int64)
    out: dict[int, list[tuple]] = {}
    for seg in sorted({r[0] for r in rows}):
        picked = []
        for r in rows:
            if r[0] != seg:
                continue
            row_sids, steps, values, times = _arrays(pg, *r[1:])
            pos = np.searchsorted(row_sids, wanted).clip(0, max(len(row_sids) - 1, 0))
            hit = pos[row_sids[pos] == wanted] if len(row_sids) else pos[:0]
            if not len(hit):
                continue
            picked.append(
                (
                    row_sids[hit],
                    steps[hit],
                    values[hit],
                    times[hit] if want_times and len(times) else _EMPTY_F,
                )
            )
        for sid, st, va, ti in _by_series(picked) if picked else ():
            out.setdefault(sid, []).append((seg, st, va, ti))
    return out


def pending_latest(session: Session, run_ids: list[int]) -> dict[int, latest.Newest]:
    """{series id: Newest} of the points in the unflushed reports of `run_ids`: what
    latest.merge puts over their series' latest rows."""
    if not run_ids:
        return {}
    pg = is_pg(session)
    q = select(_R.segment, *_payload(pg)).where(_R.run_id.in_(sorted(set(run_ids))))
    rows = session.execute(q.order_by(_R.id)).all()
    return latest.newest([(r[0], *_arrays(pg, *r[1:])) for r in rows])


def pending_values(session: Session, run_ids: list[int]) -> dict[int, tuple[int, int, float]]:
    """{series id: (segment, step, value)} of the newest point in the unflushed reports of
    `run_ids`, for ``/metrics``: what pending_latest gives, without the counts, reading less.

    A fleet run's reports carry the same series, step after step, so its newest report holds
    every series' newest point. Where a run's rows all carry one set of series and none
    reaches back before the one before it (by segment and steps, from the rows' bounds),
    only that row is read; the others' payloads are never fetched. Any other run's rows are
    all read. A scrape of 500 runs with 16 reports each read ~50 MB before."""
    if not run_ids:
        return {}
    pg = is_pg(session)
    runs = sorted(set(run_ids))
    bounds = session.execute(
        select(_R.run_id, _R.id, _R.segment, _R.step_min, _R.step_max).where(_R.run_id.in_(runs))
    ).all()
    sets = dict(
        session.execute(
            select(_R.run_id, func.count(_R.series_ids.distinct()))
            .where(_R.run_id.in_(runs))
            .group_by(_R.run_id)
        ).all()
    )
    by_run: dict[int, list[tuple]] = {}
    for run_id, rid, seg, lo, hi in bounds:
        by_run.setdefault(run_id, []).append((seg, lo, hi, rid))
    wanted: list[int] = []
    for run_id, rows in by_run.items():
        rows.sort()
        one = sets.get(run_id) == 1 and latest.steps_forward(rows)
        wanted += [rows[-1][3]] if one else [r[3] for r in rows]
    fetched = []
    for i in range(0, len(wanted), 500):
        q = select(_R.id, _R.segment, *_payload(pg)).where(_R.id.in_(wanted[i : i + 500]))
        fetched += session.execute(q).all()
    fetched.sort(key=lambda r: r[0])  # write order
    c = latest.newest_columns([(r[1], *_arrays(pg, *r[2:])) for r in fetched])
    if c is None:
        return {}
    cols = (c.sids.tolist(), c.segment.tolist(), c.step.tolist(), c.value.tolist())
    return {sid: (seg, st, v) for sid, seg, st, v in zip(*cols, strict=True)}


def pending_runs(session: Session) -> list[int]:
    """The runs that have reports."""
    return list(session.scalars(select(_R.run_id).distinct().order_by(_R.run_id)))


def pending_points(session: Session) -> int:
    """Points held by reports (storage_stats)."""
    return int(session.scalar(select(func.coalesce(func.sum(_R.n), 0))) or 0)
