"""Compaction: the small raw chunks that ingest writes become large compressed ones.

Ingest writes one uncompressed chunk per series per batch (cheap, ~1M points/s), or for a
batch of one point per series one row of reports, which the Compactor turns into one chunk
per series (reports.flush) once a run has 16 to FLUSH_REPORTS of them (flush_after) or
ingest goes quiet. When a (series, segment) has piled up MERGE_CHUNKS small chunks, the
Compactor merges them in the background once ingest pauses (or every max_wait_s under
constant load) into chunks of TARGET..2*TARGET points that codec.py compresses (SQLite) or
PostgreSQL TOASTs. Below TARGET the tail is a few merged chunks whose sizes about double
from newest to oldest (compact_many's tiered merges), so a point is rewritten a few times,
not at every merge; an explicit compaction (compact_all) merges the whole tail. Reads are
correct either way; compaction only makes them faster and the file smaller.

Concurrency: the merge reads outside the write transaction, then deletes exactly the
chunks it read and inserts the merged ones; if any of them is gone (another process
compacted first) that series' swap rolls back (a savepoint). Up to GROUP series share one
write transaction and one DELETE, so neither a commit nor a statement is paid per series
and the writer lock is held briefly. The merged chunks take the largest ids of the chunks
they replace, so "the later write wins" between equal steps keeps its meaning. Each merged
chunk gets its block summary (summary.py) in the same transaction; the replaced chunks'
summaries go with them (ON DELETE CASCADE).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterable

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.service.store import reports
from logitwatch.service.store.codec import (
    decode_floats,
    decode_steps,
    encode_floats,
    encode_steps,
    pg_array,
    pg_array_bytes,
)
from logitwatch.service.store.deferred import pg_cursor
from logitwatch.service.store.models import Chunk, ChunkSummary, Run, Series
from logitwatch.service.store.read import merge_parts
from logitwatch.service.store.reports import FLUSH_REPORTS
from logitwatch.service.store.sql import PgInt8Array, insert_chunks, is_pg, pg_arrays
from logitwatch.service.store.summary import summarize
from logitwatch.service.store.worker import Worker

__all__ = [
    "MERGE_CHUNKS",
    "PACE",
    "TARGET",
    "Compactor",
    "compact_all",
    "compact_many",
    "compact_series",
    "flush_after",
    "flush_reports",
    "release_space",
]

log = logging.getLogger(__name__)

#: Chunks of at least TARGET points are final; smaller ones get merged.
TARGET = 32_768
#: A (series, segment) is due for compaction once it has this many small chunks.
MERGE_CHUNKS = 16
_C = Chunk.__table__.c
_S = ChunkSummary.__table__.c


def _suffixes(session: Session, keys: list[tuple[int, int]]) -> dict[tuple[int, int], list]:
    """Each series-segment's small chunks written after its last final chunk, oldest first,
    as (id, n, fresh: written by ingest and not merged yet, (segment, *payload)), for a
    whole group of keys in two queries (a query per series cost more than its merge)."""
    sids = sorted({sid for sid, _ in keys})
    wanted = set(keys)
    last_final = dict.fromkeys(wanted, 0)
    finals = session.execute(
        select(_C.series_id, _C.segment, func.max(_C.id))
        .where(_C.series_id.in_(sids), _C.n >= TARGET)
        .group_by(_C.series_id, _C.segment)
    )
    for sid, seg, cid in finals:
        if (sid, seg) in wanted:
            last_final[sid, seg] = cid
    payload = [_C.steps, _C["values"], _C.times]
    if is_pg(session):
        payload = [func.array_send(col) for col in payload]
    # Every chunk a merge writes has a summary, so one without is fresh from ingest (or from
    # before summaries existed: merging it once more gives it one).
    fresh = _S.chunk_id.is_(None)
    q = (
        select(_C.series_id, _C.segment, _C.id, _C.n, fresh, _C.step_min, *payload)
        .select_from(Chunk.__table__.outerjoin(ChunkSummary.__table__, _S.chunk_id == _C.id))
        .where(_C.series_id.in_(sids), _C.n < TARGET)
        .order_by(_C.series_id, _C.segment, _C.id)
    )
    out: dict[tuple[int, int], list] = {key: [] for key in keys}
    for sid, seg, cid, n, is_fresh, *raw in session.execute(q).all():  # one fetchall
        if (sid, seg) in wanted and cid > last_final[sid, seg]:
            out[sid, seg].append((cid, n, bool(is_fresh), (seg, *raw)))
    return out


def _decoded(pg: bool, n: int, raw: tuple) -> tuple:
    """(segment, steps, values, times) of a chunk as _suffixes read it."""
    segment, step_min, steps, values, times = raw
    if pg:
        return segment, pg_array(steps, "i8"), pg_array(values, "f8"), pg_array(times, "f8")
    return (
        segment,
        decode_steps(steps, step_min, n),
        decode_floats(values, n),
        decode_floats(times, n),
    )


def _parts(pg: bool, rows: list) -> list[tuple]:
    """merge_parts' input from _suffixes' rows. The one-point chunks ingest wrote are read as
    one part per run of them when their steps rise: decoding them one by one was a third of
    a one-step-a-second series' merge on SQLite and half on PostgreSQL, measured."""
    parts, run = [], []
    for row in [*rows, None]:
        if row is not None and _one_point(pg, row):
            run.append(row[3])
            continue
        parts += _joined(pg, run)
        run = []
        if row is not None:
            parts.append(_decoded(pg, row[1], row[3]))
    return parts


def _one_point(pg: bool, row: tuple) -> bool:
    """A fresh chunk of one point whose value (and time, if any) are its payloads' last 8
    bytes: b"R" + float64 on SQLite (steps b"": the step is step_min), a one-element
    array_send on PostgreSQL (an empty times array is 12 bytes)."""
    _, n, fresh, (_, _, steps, values, times) = row
    if not (n == 1 and fresh):
        return False
    if pg:
        return len(steps) == len(values) == _PG_ONE and len(times) in (_PG_ONE, _PG_NONE)
    return not steps and values[:1] == b"R" and times[:1] in (b"R", b"")


_PG_ONE, _PG_NONE = 32, 12  # array_send of one int8/float8, of an empty array


def _joined(pg: bool, run: list[tuple]) -> list[tuple]:
    """(segment, steps, values, times) of one-point chunks (_one_point), oldest first: one
    part if their steps rise and all or none have a time, else one part each."""
    steps = np.array([raw[1] for raw in run], dtype=np.int64)
    timed = {len(raw[4]) > _PG_NONE if pg else bool(raw[4]) for raw in run}
    if len(run) < 2 or len(timed) > 1 or not (steps[1:] > steps[:-1]).all():
        return [_decoded(pg, 1, raw) for raw in run]
    kind = ">f8" if pg else "<f8"
    values = b"".join([raw[3][-8:] for raw in run])
    times = b"".join([raw[4][-8:] for raw in run]) if timed == {True} else b""
    return [
        (
            run[0][0],
            steps,
            np.frombuffer(values, dtype=kind).astype(np.float64),
            np.frombuffer(times, dtype=kind).astype(np.float64),
        )
    ]


def _encode(pg: bool, steps: np.ndarray, values: np.ndarray, times: np.ndarray) -> tuple:
    if pg:
        return pg_arrays(steps, values, times)
    return encode_steps(steps), encode_floats(values), encode_floats(times)


def compact_series(
    sessions: sessionmaker[Session],
    *,
    series_id: int,
    segment: int,
    min_chunks: int = MERGE_CHUNKS,
    lock: contextlib.AbstractContextManager | None = None,
    fresh_only: bool = False,
) -> int:
    """Merge the series-segment's small chunks if there are at least min_chunks; returns how many.

    fresh_only merges only the newest run of chunks that ingest wrote, leaving earlier merged
    ones alone: its cost is the new points, not the whole tail again.
    """
    return compact_many(
        sessions, [(series_id, segment)], min_chunks=min_chunks, lock=lock, fresh_only=fresh_only
    )


#: Series-segments whose merges share one write transaction: a commit per series cost more
#: than its merge, and a bounded group keeps the writer lock (ingest waits on it) short.
GROUP = 32
#: Runs whose reports become chunks in one write transaction: ingest waits on the writer lock
#: meanwhile, and a fleet's runs reach their 32nd report together (GROUP of them were 6,400
#: chunks a transaction, ~800 now).
FLUSH_GROUP = 4
#: Under load, the Compactor rests PACE times as long as each group of work took: at most a
#: quarter of the GIL and of the writer lock. Done in bursts (every due merge at once, every
#: max_wait_s), its merges took the GIL from the requests for seconds and the fleet's p99
#: went from ~30 ms to 100-300 ms, measured; paced, the same work is spread out, and at
#: ~5 % of a core under a 500-run fleet it keeps up with room to spare.
PACE = 3.0


def compact_many(
    sessions: sessionmaker[Session],
    keys: Iterable[tuple[int, int]],
    *,
    min_chunks: int = MERGE_CHUNKS,
    lock: contextlib.AbstractContextManager | None = None,
    fresh_only: bool = False,
    tiered: bool = False,
    pace: float = 0.0,
) -> int:
    """compact_series for each (series_id, segment) of `keys`, GROUP of them a transaction.

    tiered (the background Compactor's merges) leaves an earlier merged chunk alone until
    the newer small chunks hold as many points: each point is then rewritten about
    log2(TARGET / MERGE_CHUNKS) times on its way into a final chunk, where merging the whole
    tail every MERGE_CHUNKS batches rewrote a one-step-a-second series' tail about two
    thousand times. The reads, merges, summaries and compression happen before the lock is
    taken; the transaction only deletes and inserts. ``pace``: rest that many times as long
    as each group took (PACE).
    """
    merged = 0
    keys = list(keys)
    for i in range(0, len(keys), GROUP):
        started = time.perf_counter()
        plans = _plans(sessions, keys[i : i + GROUP], min_chunks, fresh_only, tiered)
        if not plans:
            continue
        with lock or contextlib.nullcontext(), sessions() as session:
            merged += _swap(session, plans)
            session.commit()
        if pace:
            time.sleep(pace * (time.perf_counter() - started))
    return merged


def _swap(session: Session, plans: list[tuple[list[int], list[tuple], list[dict]]]) -> int:
    """Delete exactly the chunks the plans read and insert the merged ones: one statement
    each for the whole group. If another process compacted some of them meanwhile, the
    group is undone and each series swaps alone in a savepoint, skipped if its chunks moved.
    """
    ids = [cid for plan in plans for cid in plan[0]]
    group = session.begin_nested()
    if _delete(session, ids) == len(ids):
        _insert(session, [row for p in plans for row in p[1]], [s for p in plans for s in p[2]])
        group.commit()
        return len(ids)
    group.rollback()
    merged = 0
    for ids, new, summaries in plans:
        swap = session.begin_nested()
        if _delete(session, ids) != len(ids):
            swap.rollback()  # someone else compacted these meanwhile
            continue
        _insert(session, new, summaries)
        swap.commit()
        merged += len(ids)
    return merged


def _delete(session: Session, ids: list[int]) -> int:
    """Delete chunks by id; how many there were. Straight to the driver: SQLAlchemy renders
    (and psycopg parses) a parameter per id, where PostgreSQL takes one array."""
    raw = session.connection().connection.driver_connection
    if is_pg(session):
        with pg_cursor(session) as cur:
            cur.execute(
                "DELETE FROM chunks WHERE id = ANY(%s)",
                (PgInt8Array(pg_array_bytes(np.asarray(ids, dtype=np.int64), "i8")),),
            )
            return cur.rowcount
    return raw.executemany("DELETE FROM chunks WHERE id = ?", [(cid,) for cid in ids]).rowcount


def _insert(session: Session, chunks: list[tuple], summaries: list[dict]) -> None:
    insert_chunks(session, chunks, with_id=True)
    session.execute(insert(ChunkSummary.__table__), summaries)


def _plans(
    sessions: sessionmaker[Session],
    keys: list[tuple[int, int]],
    min_chunks: int,
    fresh_only: bool,
    tiered: bool,
) -> list[tuple[list[int], list[tuple], list[dict]]]:
    """The plan (_plan) of each series-segment of `keys` that has enough to merge."""
    with sessions() as session:
        pg = is_pg(session)
        suffixes = _suffixes(session, keys)
    plans = []
    for (series_id, segment), rows in suffixes.items():
        rows = _to_merge(rows, fresh_only=fresh_only, tiered=tiered)
        if len(rows) >= max(2, min_chunks):
            plans.append(_plan(series_id, segment, rows, pg))
    return plans


def _to_merge(rows: list, *, fresh_only: bool, tiered: bool) -> list:
    """The newest chunks of a suffix (_suffixes) that a merge takes: all of them, the
    trailing fresh ones (fresh_only), or (tiered) those and each earlier one whose points
    the newer ones taken already match."""
    if not (fresh_only or tiered):
        return rows
    first, total = len(rows), 0
    while first > 0:
        _, n, fresh, _ = rows[first - 1]
        if not (fresh or (tiered and n <= total)):
            break
        first -= 1
        total += n
    return rows[first:]


def _plan(
    series_id: int, segment: int, rows: list, pg: bool
) -> tuple[list[int], list[tuple], list[dict]]:
    """(ids to delete, merged chunk rows, their summaries) of one series-segment."""
    steps, values, times = merge_parts(_parts(pg, rows))
    ids = [cid for cid, _, _, _ in rows]
    pieces = max(1, len(steps) // TARGET)  # pieces of TARGET..2*TARGET points
    bounds = [0, len(steps)] if pieces == 1 else np.linspace(0, len(steps), pieces + 1).astype(int)
    new, summaries = [], []
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        st = steps[a:b]
        ti = times[a:b] if len(times) else times
        cid = ids[len(ids) - pieces + k]
        level, blocks = summarize(st, values[a:b])
        summaries.append({"chunk_id": cid, "level": level, "blocks": blocks})
        new.append(
            (
                cid,
                series_id,
                segment,
                int(st[0]),
                int(st[-1]),
                len(st),
                *_encode(pg, st, values[a:b], ti),
            )
        )
    return ids, new, summaries


def flush_reports(
    sessions: sessionmaker[Session],
    run_ids: Iterable[int],
    *,
    lock: contextlib.AbstractContextManager | None = None,
    pace: float = 0.0,
) -> list[tuple[int, int]]:
    """Turn the reports of `run_ids` into chunks (reports.flush), FLUSH_GROUP runs a
    transaction; the (series id, segment) of each chunk written. Between groups a writer
    waiting on the lock takes it (a 1 ms rest, or ``pace`` times as long as the group took).
    """
    run_ids, keys = sorted(set(run_ids)), []
    for i in range(0, len(run_ids), FLUSH_GROUP):
        started = time.perf_counter()
        with lock or contextlib.nullcontext(), sessions() as session:
            keys += reports.flush(session, run_ids[i : i + FLUSH_GROUP])
            session.commit()
        if i + FLUSH_GROUP < len(run_ids) or pace:
            time.sleep(max(0.001, pace * (time.perf_counter() - started)))
    return keys


def compact_all(
    sessions: sessionmaker[Session], *, run: str | None = None, min_chunks: int = 2, lock=None
) -> int:
    """Compact every series-segment (of `run`, or of all runs) with min_chunks small chunks,
    after turning the reports (of `run`, or of all runs) into chunks."""
    with sessions() as session:
        if run is None:
            runs = reports.pending_runs(session)
        else:
            runs = list(session.scalars(select(Run.id).where(Run.name == run)))
    flush_reports(sessions, runs, lock=lock)
    q = (
        select(_C.series_id, _C.segment)
        .where(_C.n < TARGET)
        .group_by(_C.series_id, _C.segment)
        .having(func.count() >= min_chunks)
    )
    if run is not None:
        q = q.join(Series, Series.id == _C.series_id).join(Run).where(Run.name == run)
    with sessions() as session:
        keys = [(s, g) for s, g in session.execute(q)]
    return compact_many(sessions, keys, min_chunks=min_chunks, lock=lock)


def release_space(sessions: sessionmaker[Session], *, lock=None) -> None:
    """SQLite: give the free pages left by replaced chunks back to the file system.

    Works on files created with auto_vacuum=INCREMENTAL (every file db.make_engine makes);
    elsewhere it does nothing. PostgreSQL reuses the space after autovacuum.
    """
    bind = sessions.kw["bind"]
    if bind.dialect.name != "sqlite":
        return
    with lock or contextlib.nullcontext():
        raw = bind.raw_connection()
        try:
            # executescript steps the pragma to the end (execute frees a single page).
            raw.driver_connection.executescript("PRAGMA incremental_vacuum;")
        finally:
            raw.close()


def flush_after(run_id: int) -> int:
    """Reports of a run that make a flush of them due: FLUSH_REPORTS / 2 to FLUSH_REPORTS
    by the run's id, so that runs started together (a fleet, a sweep) do not all flush in
    the same second. 500 runs flushing at once held the writer lock and the GIL for ~300
    ms, measured."""
    half = FLUSH_REPORTS // 2
    return half + run_id % (half + 1)


class Compactor:
    """Counts the chunks ingest writes per (series, segment) and merges them in the background.

    It works when ingest has been quiet for `idle_s` (compression is CPU the ingest path
    would otherwise compete for) or when `max_wait_s` has passed since the first due work.
    After `deep_idle_s` of quiet it also turns every run's reports into chunks and merges
    the fresh chunks (2+) of every series it saw (fresh_only: already merged ones are not
    rewritten), so that a run that stops or pauses ends up compacted.

    Reports (reports.py) are turned into chunks as soon as a run has flush_after(run) of
    them (16 to FLUSH_REPORTS), without waiting for quiet: a flush compresses nothing, and
    it bounds what a read of the run goes through. The reports left by an earlier process
    are flushed at the first deep idle.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        lock: contextlib.AbstractContextManager,
        *,
        idle_s: float = 1.0,
        max_wait_s: float = 30.0,
        deep_idle_s: float = 2.0,
    ) -> None:
        self._sessions = sessions
        self._lock = lock
        self._idle_s = idle_s
        self._max_wait_s = max_wait_s
        self._deep_idle_s = deep_idle_s
        self._touched: set[tuple[int, int]] = set()
        self._counts: dict[tuple[int, int], int] = {}
        self._due: set[tuple[int, int]] = set()
        #: Reports per run since its last flush; the runs due for one.
        self._reports: dict[int, int] = {}
        self._flush_due: set[int] = set()
        #: Whether the runs with reports were looked up (at the first deep idle after start).
        self._scanned = False
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_ingest = 0.0
        self._due_since: float | None = None
        self._worker = Worker("logitwatch-compactor", self._loop, self._stop, self._wake)

    def touch(self, series_ids: Iterable[int], segment: int) -> None:
        """Ingest wrote one chunk for each of series_ids in segment."""
        self.touch_chunks([(sid, segment) for sid in series_ids])

    def touch_chunks(self, keys: Iterable[tuple[int, int]], *, ingest: bool = True) -> None:
        """One chunk was written for each (series id, segment) of `keys` (by ingest, or by a
        flush of reports: ingest=False, which is no sign of load)."""
        now = time.monotonic()
        with self._mutex:
            if ingest:
                self._last_ingest = now
            for key in keys:
                self._touched.add(key)
                n = self._counts.get(key, 0) + 1
                if n >= MERGE_CHUNKS:
                    self._due.add(key)
                    n = 0
                    if self._due_since is None:
                        self._due_since = now
                        self._wake.set()
                self._counts[key] = n

    def touch_report(self, run_id: int) -> None:
        """Ingest wrote one row of reports for run_id."""
        with self._mutex:
            self._last_ingest = time.monotonic()
            n = self._reports.get(run_id, 0) + 1
            if n >= flush_after(run_id):
                self._flush_due.add(run_id)
                self._wake.set()
            self._reports[run_id] = n

    def start(self) -> None:
        if not self._worker.running:
            # Quiet is counted from now: the first look at the database waits for deep_idle_s.
            self._last_ingest = time.monotonic()
            self._worker.start()

    def close(self) -> None:
        self._worker.close()

    def _take(self) -> tuple[list[int], list[tuple[int, int]], bool]:
        """(runs whose reports to flush, keys to compact, deep): what it is time for."""
        with self._mutex:
            self._wake.clear()  # wake again on new work; else look every idle_s
            quiet_for = time.monotonic() - self._last_ingest
            flush = self._flush_due
            self._flush_due = set()
            for run_id in flush:
                self._reports.pop(run_id, None)
            if self._due:
                overdue = (
                    self._due_since is not None
                    and time.monotonic() - self._due_since >= self._max_wait_s
                )
                if quiet_for >= self._idle_s or overdue:
                    work, self._due, self._due_since = sorted(self._due), set(), None
                    return sorted(flush), work, False
            elif (
                self._touched or self._reports or not self._scanned
            ) and quiet_for >= self._deep_idle_s:
                flush |= set(self._reports)
                self._reports = {}
                work, self._touched = sorted(self._touched), set()
                return sorted(flush), work, True
            return sorted(flush), [], False

    def _flush(self, run_ids: list[int]) -> list[tuple[int, int]]:
        """flush_reports of run_ids, the chunks it wrote counted (touch_chunks)."""
        if not run_ids:
            return []
        try:
            keys = flush_reports(self._sessions, run_ids, lock=self._lock, pace=PACE)
        except Exception:  # the reports stay, and reads still see them
            log.exception("turning the reports of runs %s into chunks failed", run_ids)
            return []
        self.touch_chunks(keys, ingest=False)
        return keys

    def _left_over(self) -> list[int]:
        """The runs with reports, once per Compactor (those of an earlier process too)."""
        if self._scanned:
            return []
        self._scanned = True
        try:
            with self._sessions() as session:
                return reports.pending_runs(session)
        except Exception:
            log.exception("listing the runs with reports failed")
            return []

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self._idle_s)
            flush, work, deep = self._take()
            if deep:
                flush = sorted({*flush, *self._left_over()})
            flushed = self._flush(flush)
            if deep and flushed:
                work = sorted({*work, *flushed})
            merged = 0
            for i in range(0, len(work), GROUP):
                if self._stop.is_set():
                    break
                try:
                    merged += compact_many(
                        self._sessions,
                        work[i : i + GROUP],
                        min_chunks=2 if deep else MERGE_CHUNKS,
                        lock=self._lock,
                        fresh_only=deep,
                        tiered=not deep,
                        pace=0.0 if deep else PACE,
                    )
                except Exception:  # a failed merge leaves the chunks as they were
                    log.exception("compaction of series-segments %s failed", work[i : i + GROUP])
            if merged:
                try:
                    release_space(self._sessions, lock=self._lock)
                except Exception:
                    log.exception("releasing free pages failed")
