"""Storing a batch: idempotency record, series ids, its points, latest values (latest.py).

One call is one transaction's worth of work (the caller commits), so a rejected batch
changes nothing. Core bulk statements, not ORM objects: ingest runs at ~1M points/s.
A batch of one point per series (the fleet's report) is one row of reports (reports.py);
any other batch is one chunk per series, written after the run's reports became chunks.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

import numpy as np
from sqlalchemy.orm import Session

from logitwatch.protocol import Batch, Series
from logitwatch.service.store import latest, reports
from logitwatch.service.store.codec import raw_floats, raw_steps
from logitwatch.service.store.deferred import defer, driver_rows, pg_execute, pg_rows
from logitwatch.service.store.limits import LimitError
from logitwatch.service.store.models import utcnow
from logitwatch.service.store.runs import ensure_run_id
from logitwatch.service.store.sql import (
    cache,
    insert_chunks,
    is_pg,
    labels_key,
    pg_arrays,
    pg_one,
    remember,
)

__all__ = [
    "Columns",
    "IngestResult",
    "Prepared",
    "Shape",
    "batch_points",
    "ingest_batch",
    "mark_statements",
    "prepare_batch",
    "series_columns",
]


@dataclass(slots=True)
class IngestResult:
    duplicate: bool
    n_points: int
    #: The batch's series, one chunk each, unless it was stored as a report.
    series_ids: list[int] = field(default_factory=list)
    run_id: int = 0
    #: Stored as one row of reports (reports.py) rather than as chunks.
    report: bool = False
    #: (series id, segment) of the chunks made of the run's reports before this batch's.
    flushed: list[tuple[int, int]] = field(default_factory=list)


def _label_int(labels: dict[str, str], key: str) -> int | None:
    v = labels.get(key)
    return int(v) if v is not None and v.isdigit() and len(v) < 10 else None


def _series_ids(
    session: Session,
    run_id: int,
    series: list[Series],
    lkeys: list[str],
    max_series: int,
    shape: Shape | None = None,
) -> list[int]:
    get = cache(session).get
    if shape is not None and (known := get(("shape", run_id, shape))) is not None:
        return list(known)
    ids = [get((run_id, s.metric, k)) for s, k in zip(series, lkeys, strict=True)]
    if None not in ids:
        if shape is not None:
            remember(session, {("shape", run_id, shape): tuple(ids)})
        return ids  # type: ignore[return-value]
    keys = [(run_id, s.metric, k) for s, k in zip(series, lkeys, strict=True)]
    missing = {k for k, i in zip(keys, ids, strict=True) if i is None}
    found = _lookup(session, run_id, missing)
    new = sorted(missing - found.keys())
    if new:
        count = (_COUNT_SERIES.format("%s"), (run_id,)), (_COUNT_SERIES.format("?"), (run_id,))
        have = driver_rows(session, *count)[0][0]
        if have + len(new) > max_series:
            raise LimitError(
                "series",
                f"this batch would bring the run to {have + len(new)} series; "
                f"the limit is max_series_per_run={max_series}",
            )
        by_key = {k: s for k, s in zip(keys, series, strict=True)}
        rows = [
            (
                run_id,
                k[1],
                json.dumps(by_key[k].labels),  # as SQLAlchemy's JSON type writes it
                k[2],
                _label_int(by_key[k].labels, "layer"),
                _label_int(by_key[k].labels, "head"),
            )
            for k in new
        ]
        # Another process may create the same series at the same moment: the unique key
        # decides, and the SELECT below reads whichever row won.
        if is_pg(session):
            columns = [list(c) for c in zip(*rows, strict=True)]
            pg_execute(session, _PG_INSERT_SERIES, columns).close()
        else:
            session.connection().connection.driver_connection.executemany(
                _SQLITE_INSERT_SERIES, rows
            )
        found.update(_lookup(session, run_id, set(new)))
    remember(session, found)
    return [i if i is not None else found[k] for k, i in zip(keys, ids, strict=True)]


def _lookup(session: Session, run_id: int, keys: set[tuple]) -> dict[tuple, int]:
    metrics = sorted({k[1] for k in keys})
    sqlite = _SQLITE_LOOKUP.format(", ".join("?" * len(metrics)))
    rows = driver_rows(session, (_PG_LOOKUP, (run_id, metrics)), (sqlite, (run_id, *metrics)))
    out = {}
    for sid, metric, lkey in rows:
        k = (run_id, metric, lkey)
        if k in keys:
            out[k] = sid
    return out


# A run's first report makes its ~200 series: by the driver, as the rest of ingest does
# (SQLAlchemy's insert and selects were ~2.5 ms of a first report's ~10 ms, measured).
_COUNT_SERIES = "SELECT count(*) FROM series WHERE run_id = {}"
_SERIES_COLS = "run_id, metric, labels, labels_key, layer, head"
_SERIES_CONFLICT = "ON CONFLICT (run_id, metric, labels_key) DO NOTHING"
_SQLITE_INSERT_SERIES = (
    f"INSERT INTO series ({_SERIES_COLS}) VALUES (?, ?, ?, ?, ?, ?) {_SERIES_CONFLICT}"
)
_PG_INSERT_SERIES = (
    f"INSERT INTO series ({_SERIES_COLS}) SELECT * FROM unnest(%s::int8[], %s::text[],"
    f" %s::text[]::jsonb[], %s::text[], %s::int4[], %s::int4[]) {_SERIES_CONFLICT}"
)
_LOOKUP = "SELECT id, metric, labels_key FROM series WHERE run_id = {} AND metric {}"
_SQLITE_LOOKUP = _LOOKUP.format("?", "IN ({})")
_PG_LOOKUP = _LOOKUP.format("%s", "= ANY(%s)")


class Columns(NamedTuple):
    """One series' arrays as stored and as the rules read them (see series_columns)."""

    steps: np.ndarray  # int64, ascending and unique
    values: np.ndarray  # float64, one per step
    times: np.ndarray  # float64, one per step, or empty when the client sent none


def series_columns(s: Series) -> Columns:
    """Steps ascending and unique (a step sent twice in one series keeps its last value).

    The one normalisation of a series' points: the store writes these arrays and the rule
    engine evaluates them, so both agree on which value a repeated step has.
    """
    steps = np.frombuffer(s.steps, dtype=np.int64)
    values = np.frombuffer(s.values, dtype=np.float64)
    times = np.frombuffer(s.times, dtype=np.float64)
    if len(steps) > 1 and not (steps[1:] > steps[:-1]).all():
        order = np.argsort(steps, kind="stable")
        steps = steps[order]
        keep = np.append(steps[1:] != steps[:-1], True)
        steps, values = steps[keep], values[order][keep]
        times = times[order][keep] if len(times) else times
    return Columns(steps, values, times)


class Shape:
    """The series of a run's one-step report, in order: ``(metric, labels_key)`` pairs,
    hashed once. A decoder that knows a report's shape (api/layouts.py) passes it on, and
    the store and the rules look up by it what they would otherwise key by each series:
    the run's series ids, the rules' layout."""

    __slots__ = ("_hash", "pairs")

    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self.pairs = pairs
        self._hash = hash(pairs)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (type(other) is Shape and self.pairs == other.pairs)


@dataclass(slots=True)
class Prepared:
    """A batch's chunk payloads, packed before the write lock is taken (prepare_batch)."""

    postgres: bool
    #: (index in batch.series, chunk columns after series_id, latest columns after series_id)
    rows: list[tuple[int, tuple, tuple]]
    #: Each series' normalised arrays, in batch.series order: what RuleEngine.on_batch reads.
    columns: list[Columns]
    #: Each series' labels_key, in batch.series order (the store and the rules both use it).
    keys: list[str] = field(default_factory=list)
    #: A batch whose every series has one point (the fleet's report): its steps, values and
    #: times as three arrays in batch.series order, stored as one row of reports (rows is
    #: then empty).
    points: Columns | None = None
    #: The batch's Shape, when its decoder knew it (every series non-empty).
    shape: Shape | None = None


def prepare_batch(batch: Batch, *, postgres: bool) -> Prepared:
    """Sort, dedupe and pack each series' arrays: CPU work that needs no database."""
    one = _one_point(batch, postgres)
    if one is not None:
        return one
    seg, rows = batch.segment, []
    columns = _columns(batch.series)
    for i, (s, c) in enumerate(zip(batch.series, columns, strict=True)):
        steps, values, times = c
        n = len(steps)
        if not n:
            continue
        if len(s.steps) == 1:  # one step a request, the fleet's shape: no numpy on the way
            lo = hi = s.steps[0]
            last, last_time = s.values[0], (s.times[0] if len(s.times) else None)
            if postgres:
                payload = pg_one(lo, last, last_time)
            else:
                payload = (b"", _raw(s.values), _raw(s.times) if len(s.times) else b"")
        else:
            lo, hi = int(steps[0]), int(steps[-1])
            last, last_time = float(values[-1]), (float(times[-1]) if len(times) else None)
            payload = (
                _pack_pg(steps, values, times) if postgres else _pack_sqlite(steps, values, times)
            )
        rows.append((i, (seg, lo, hi, n, *payload), (seg, hi, last, last_time, n, lo)))
    return Prepared(postgres, rows, columns, [labels_key(s.labels) for s in batch.series])


def _one_point(batch: Batch, postgres: bool) -> Prepared | None:
    """prepare_batch of a batch whose every series has one step, and all a time or none:
    the fleet's report. Columns are row views of three arrays for the whole batch, which the
    store writes as one row of reports (_store_points, reports.py)."""
    series = batch.series
    n = len(series)
    if n < 8 or [len(s.steps) for s in series].count(1) != n:
        return None
    n_times = [len(s.times) for s in series].count(1)
    if n_times not in (0, n):
        return None
    steps = np.frombuffer(b"".join([s.steps for s in series]), dtype=np.int64)
    values = np.frombuffer(b"".join([s.values for s in series]), dtype=np.float64)
    if n_times:
        times = np.frombuffer(b"".join([s.times for s in series]), dtype=np.float64)
        t_rows = times.reshape(n, 1)
    else:
        times = np.empty(0, dtype=np.float64)
        t_rows = [times] * n
    new = tuple.__new__
    columns = [
        new(Columns, c) for c in zip(steps.reshape(n, 1), values.reshape(n, 1), t_rows, strict=True)
    ]
    keys = [labels_key(s.labels) for s in series]
    return Prepared(postgres, [], columns, keys, Columns(steps, values, times))


def _columns(series: list[Series]) -> list[Columns]:
    """series_columns of every series, from three numpy arrays for the whole batch: one
    np.frombuffer per series and column costs more than the rest of a one-point series."""
    if len(series) < 8:
        return [series_columns(s) for s in series]
    steps = np.frombuffer(b"".join([s.steps for s in series]), dtype=np.int64)
    values = np.frombuffer(b"".join([s.values for s in series]), dtype=np.float64)
    times = np.frombuffer(b"".join([s.times for s in series]), dtype=np.float64)
    ends = np.cumsum([len(s.steps) for s in series]).tolist()
    t_ends = np.cumsum([len(s.times) for s in series]).tolist()
    # Series whose steps are not ascending and unique: a step not above the one before it,
    # other than at the start of a series.
    unsorted = set()
    if len(steps) > 1:
        bad = np.flatnonzero(steps[1:] <= steps[:-1]) + 1
        if len(bad):
            starts = np.searchsorted(ends, bad, side="right")
            first = np.asarray([0, *ends[:-1]])[starts]
            unsorted = set(starts[bad != first].tolist())
    out, a, ta = [], 0, 0
    for i, (b, tb) in enumerate(zip(ends, t_ends, strict=True)):
        if i in unsorted:
            out.append(series_columns(series[i]))
        else:
            out.append(Columns(steps[a:b], values[a:b], times[ta:tb]))
        a, ta = b, tb
    return out


def _raw(a) -> bytes:
    """codec.raw_floats of an array('d') of one value, without numpy."""
    return b"R" + (a.tobytes() if _LITTLE else np.asarray(a, dtype="<f8").tobytes())


_LITTLE = sys.byteorder == "little"


def ingest_batch(
    session: Session,
    *,
    run: str,
    batch: Batch,
    max_series: int = 100_000,
    prepared: Prepared | None = None,
    marked: bool | None = None,
) -> IngestResult:
    """Store `batch` for `run` (created if new) unless (run, client, seq) was stored before.

    `prepared` (from prepare_batch) lets the caller pack the arrays before taking a lock.
    `marked`: the answer of mark_statements, when the caller sent them in this transaction
    (the run's row locked and the batch recorded: True, or recorded before: False).
    """
    run_id = ensure_run_id(session, run)
    n_points = batch_points(batch, prepared)
    if marked is None:
        marked = _mark(session, run_id, batch, n_points)
    if not marked:
        return IngestResult(duplicate=True, n_points=n_points, run_id=run_id)
    pg = is_pg(session)
    if prepared is None or prepared.postgres != pg:
        prepared = prepare_batch(batch, postgres=pg)
    ids = _series_ids(session, run_id, batch.series, prepared.keys, max_series, prepared.shape)
    flushed: list[tuple[int, int]] = []
    if prepared.points is not None:
        _store_points(session, run_id, ids, batch.segment, prepared.points)
    else:
        # A chunk must be newer than every report of its run (reports.py): the run's
        # reports become chunks first.
        flushed = reports.flush(session, [run_id])
        insert_chunks(session, [(ids[i], *chunk) for i, chunk, _ in prepared.rows])
        latest.upsert(session, [(ids[i], *last) for i, _, last in prepared.rows], pg)
    _seen(session, run_id)
    return IngestResult(
        duplicate=False,
        n_points=n_points,
        series_ids=ids,
        run_id=run_id,
        report=prepared.points is not None,
        flushed=flushed,
    )


def batch_points(batch: Batch, prepared: Prepared | None) -> int:
    """The points of `batch` (what its idempotency record counts)."""
    if prepared is not None and prepared.points is not None:
        return len(prepared.points.steps)
    return batch.n_points


def mark_statements(run_id: int, batch: Batch, n_points: int) -> list[tuple[str, tuple]]:
    """PostgreSQL: what ingest_batch sends first, as (sql, params): the run's row locked,
    then the batch's record, whose rows are [] when the batch was stored before. A caller
    may read them in one round trip with others' (api/ingest.py sends a whole group's at
    once) and pass ingest_batch ``marked=bool(rows)``.

    Every write of a run (the batch's record, its series, latest rows, reports, rule state)
    happens under that one lock, taken first; a group commit takes its runs' locks in name
    order (db.GroupCommit) and a flush of reports takes them the same way (reports.flush).
    Without it, two processes storing the same batch could each hold what the other waits
    for: one the batch's record, the other the latest rows of a batch before. SQLite has one
    writer, so it needs no lock. A concurrent insert of the same record waits for the other
    transaction and then does nothing, so two processes never both store one batch."""
    mark = (run_id, batch.client, batch.seq, utcnow(), n_points)
    return [(_PG_LOCK_RUN, (run_id,)), (_PG_MARK + " RETURNING 1", mark)]


# NO KEY UPDATE: the strength the rule engine's lock and the last_seen_at update take, and
# no conflict with the KEY SHARE locks that foreign keys to the run take.
_PG_LOCK_RUN = "SELECT 1 FROM runs WHERE id = %s FOR NO KEY UPDATE"


def _store_points(
    session: Session, run_id: int, ids: list[int], segment: int, points: Columns
) -> None:
    """A one-point batch (Prepared.points): one row of reports. Its series' latest rows
    are written when the run's reports are flushed (latest.py)."""
    steps, values, times = points
    reports.write(session, run_id, segment, ids, steps, values, times)


def _mark(session: Session, run_id: int, batch: Batch, n_points: int) -> bool:
    """Record (run, client, seq), the run's row locked first on PostgreSQL
    (mark_statements); False if it was recorded before (a resent batch)."""
    if is_pg(session):
        return bool(pg_rows(session, *mark_statements(run_id, batch, n_points))[1])
    raw = session.connection().connection.driver_connection
    stamp = _sqlite_stamp(utcnow())
    return (
        raw.execute(_SQLITE_MARK, (run_id, batch.client, batch.seq, stamp, n_points)).rowcount == 1
    )


def _sqlite_stamp(t: datetime) -> str:
    """How models.UtcDateTime stores a time on SQLite (SQLAlchemy's format): naive UTC text."""
    return t.replace(tzinfo=None).isoformat(" ")


_MARK = "INSERT INTO batches (run_id, client, seq, received_at, n_points) VALUES ({}) ON CONFLICT DO NOTHING"
_PG_MARK = _MARK.format(", ".join(["%s"] * 5))
_SQLITE_MARK = _MARK.format(", ".join(["?"] * 5))


def _seen(session: Session, run_id: int) -> None:
    # At most one write a second per run and process: concurrent batches of one run would
    # otherwise queue on this row's lock, one commit after another.
    key, now = ("seen", run_id), time.monotonic()
    ids_cache = cache(session)
    if now - ids_cache.get(key, -1e9) < 1.0:
        return
    ids_cache[key] = now
    stamp = utcnow()
    if is_pg(session):
        defer(session, _SEEN.format(p="%s"), (stamp, run_id, stamp - timedelta(seconds=1)))
    else:
        raw = session.connection().connection.driver_connection
        args = (_sqlite_stamp(stamp), run_id, _sqlite_stamp(stamp - timedelta(seconds=1)))
        raw.execute(_SEEN.format(p="?"), args)


_SEEN = (
    "UPDATE runs SET last_seen_at = {p} WHERE id = {p}"
    " AND (last_seen_at IS NULL OR last_seen_at < {p})"
)


def _pack_sqlite(steps, values, times) -> tuple:
    return raw_steps(steps), raw_floats(values), raw_floats(times)


def _pack_pg(steps, values, times) -> tuple:
    return pg_arrays(steps, values, times)
