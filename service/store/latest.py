"""Each series' newest point (the ``latest`` table), kept by chunk writes and report flushes.

A chunk (a batch of several points per series) upserts its series' latest rows as it is
written. A report (a fleet run's one-step batch, reports.py) does not: rewriting ~200 latest
rows a request was a tenth of a report's cost on SQLite and ~40 % of PostgreSQL's CPU,
measured. The flush that turns a run's reports into chunks upserts those rows once per
series instead, so the table lags by the reports a run has not flushed yet (at most about
reports.FLUSH_REPORTS of them). Readers add those: ``newest`` summarises report arrays per
series and ``merge`` puts a summary over a stored row, by the table's own rule.

The rule: the newest point is the largest (segment, step); a later write wins a tie. n_points
counts every point received, first_step is the smallest step of any segment. NaN is NULL on
SQLite (see models.Latest).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np
from sqlalchemy.orm import Session

from logitwatch.service.store.codec import pg_array_bytes
from logitwatch.service.store.deferred import defer
from logitwatch.service.store.sql import PgArray, PgInt8Array

__all__ = ["Newest", "merge", "newest", "upsert"]


class Newest(NamedTuple):
    """A series' newest point and its counts: a latest row's columns after series_id."""

    segment: int
    step: int
    value: float
    time: float | None
    n_points: int
    first_step: int


def upsert(session: Session, rows: list[tuple], pg: bool) -> None:
    """Upsert latest rows ``(series_id, *Newest)``, sorted first: concurrent writers then
    lock them in one order and never deadlock."""
    rows.sort()
    if not rows:
        return
    if pg:
        # One statement over arrays: executemany would cost ~20 us of Python a row.
        defer(session, _PG_LATEST, _pg_arrays(rows))
    else:
        raw = session.connection().connection.driver_connection
        raw.executemany(_SQLITE_LATEST, rows)


def newest(parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """{series id: Newest} of report rows ``(segment, series_ids, steps, values, times)`` in
    write order (times empty when the row had none)."""
    parts = [p for p in parts if len(p[1])]
    if not parts:
        return {}
    sizes = [len(p[1]) for p in parts]
    seg = np.repeat(np.asarray([p[0] for p in parts], dtype=np.int64), sizes)
    order = np.repeat(np.arange(len(parts)), sizes)
    sids = np.concatenate([p[1] for p in parts])
    steps = np.concatenate([p[2] for p in parts])
    values = np.concatenate([p[3] for p in parts])
    timed = np.repeat(np.asarray([len(p[4]) > 0 for p in parts]), sizes)
    times = np.concatenate([p[4] if len(p[4]) else np.full(len(p[1]), np.nan) for p in parts])
    idx = np.lexsort((order, steps, seg, sids))  # each series' newest point last
    s = sids[idx]
    starts = np.flatnonzero(np.append(True, s[1:] != s[:-1]))
    ends = np.append(starts[1:], len(s)) - 1
    last = idx[ends]
    first = np.minimum.reduceat(steps[idx], starts)
    n = np.diff(np.append(starts, len(s)))
    out = {}
    for sid, sg, st, v, t, has_t, k, f in zip(
        sids[last].tolist(),
        seg[last].tolist(),
        steps[last].tolist(),
        values[last].tolist(),
        times[last].tolist(),
        timed[last].tolist(),
        n.tolist(),
        first.tolist(),
        strict=True,
    ):
        out[sid] = Newest(sg, st, v, t if has_t else None, k, f)
    return out


def merge(stored: Newest | None, pending: Newest | None) -> Newest | None:
    """A stored latest row (None: none yet) with the newest of the run's unflushed reports
    over it (None: none): what the row will be once they are flushed."""
    if pending is None or stored is None:
        return stored if pending is None else pending
    newer = (pending.segment, pending.step) >= (stored.segment, stored.step)
    top = pending if newer else stored
    return Newest(
        top.segment,
        top.step,
        top.value,
        top.time,
        stored.n_points + pending.n_points,
        min(stored.first_step, pending.first_step),
    )


def _pg_arrays(rows: list[tuple]) -> list[PgArray]:
    """_PG_LATEST's seven arrays in binary form: psycopg adapting lists of Python numbers
    cost 0.6 ms of the 1.7 ms a 200-series batch's PostgreSQL ingest took, measured."""
    sid, seg, step, value, last_time, n, first = zip(*rows, strict=True)
    ints = [
        PgInt8Array(pg_array_bytes(np.array(c, dtype=np.int64), "i8")) for c in (sid, seg, step)
    ]
    return [
        *ints,
        PgArray(pg_array_bytes(np.array(value, dtype=np.float64), "f8")),
        _pg_nullable_floats(last_time),
        *(PgInt8Array(pg_array_bytes(np.array(c, dtype=np.int64), "i8")) for c in (n, first)),
    ]


def _pg_nullable_floats(xs: tuple) -> PgArray:
    """A float8[] whose None elements are NULL (a time the client did not send)."""
    if None not in xs:
        return PgArray(pg_array_bytes(np.array(xs, dtype=np.float64), "f8"))
    head = _PG_ARRAY_HEAD.pack(1, 1, 701, len(xs), 1)
    return PgArray(head + b"".join(_PG_NULL if x is None else _PG_F8.pack(8, x) for x in xs))


_PG_ARRAY_HEAD = struct.Struct(">iiiii")  # ndim, has-null, element oid, size, lower bound
_PG_F8 = struct.Struct(">id")
_PG_NULL = struct.pack(">i", -1)

# Newest point = largest (segment, step); NULL value means NaN on SQLite (see models.Latest).
_NEWER = (
    "(excluded.segment > latest.segment"
    " OR (excluded.segment = latest.segment AND excluded.step >= latest.step))"
)


def _latest_sql(param: str, least: str) -> str:
    keep_newest = ", ".join(
        f"{c} = CASE WHEN {_NEWER} THEN excluded.{c} ELSE latest.{c} END"
        for c in ("segment", "step", "value", "time")
    )
    return (
        "INSERT INTO latest (series_id, segment, step, value, time, n_points, first_step) "
        f"VALUES ({', '.join([param] * 7)}) ON CONFLICT (series_id) DO UPDATE SET {keep_newest}, "
        "n_points = latest.n_points + excluded.n_points, "
        f"first_step = {least}(latest.first_step, excluded.first_step)"
    )


_SQLITE_LATEST = _latest_sql("?", "min")
_PG_LATEST = _latest_sql("%s", "least").replace(
    f"VALUES ({', '.join(['%s'] * 7)})",
    "SELECT * FROM unnest(%s::int8[], %s::int8[]::int4[], %s::int8[], %s::float8[],"
    " %s::float8[], %s::int8[], %s::int8[])",
)
