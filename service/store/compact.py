"""Compaction: the small raw chunks that ingest writes become large compressed ones.

Ingest writes one uncompressed chunk per series per batch (cheap, ~1M points/s). When a
(series, segment) has piled up MERGE_CHUNKS small chunks, the Compactor merges them in
the background once ingest pauses (or every max_wait_s under constant load) into chunks
of TARGET..2*TARGET points that codec.py compresses (SQLite) or PostgreSQL TOASTs; the
tail below TARGET stays one small chunk until more points arrive. Reads are correct either way; compaction only
makes them faster and the file smaller.

Concurrency: the merge reads outside the write transaction, then deletes exactly the
chunks it read and inserts the merged ones; if any of them is gone (another process
compacted first) that series' swap rolls back (a savepoint). Up to GROUP series share one
write transaction, so a commit is not paid per series and the writer lock is held briefly. The merged chunks take the largest ids of the chunks they
replace, so "the later write wins" between equal steps keeps its meaning. Each merged chunk
gets its block summary (summary.py) in the same transaction; the replaced chunks' summaries
go with them (ON DELETE CASCADE).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterable

import numpy as np
from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.service.store.codec import (
    decode_floats,
    decode_steps,
    encode_floats,
    encode_steps,
    pg_array,
)
from logitwatch.service.store.models import Chunk, ChunkSummary, Run, Series
from logitwatch.service.store.read import merge_parts
from logitwatch.service.store.sql import insert_chunks, is_pg, pg_arrays
from logitwatch.service.store.summary import summarize

__all__ = [
    "MERGE_CHUNKS",
    "TARGET",
    "Compactor",
    "compact_all",
    "compact_many",
    "compact_series",
    "release_space",
]

log = logging.getLogger(__name__)

#: Chunks of at least TARGET points are final; smaller ones get merged.
TARGET = 32_768
#: A (series, segment) is due for compaction once it has this many small chunks.
MERGE_CHUNKS = 16
_C = Chunk.__table__.c
_S = ChunkSummary.__table__.c


def _suffix(session: Session, series_id: int, segment: int) -> list:
    """The small chunks written after the series-segment's last final chunk, oldest first,
    as (id, (segment, steps, values, times), fresh: written by ingest and not merged yet)."""
    last_final = session.scalar(
        select(func.max(_C.id)).where(
            _C.series_id == series_id, _C.segment == segment, _C.n >= TARGET
        )
    )
    pg = is_pg(session)
    payload = [_C.steps, _C["values"], _C.times]
    if pg:
        payload = [func.array_send(col) for col in payload]
    # Every chunk a merge writes has a summary, so one without is fresh from ingest (or from
    # before summaries existed: merging it once more gives it one).
    fresh = _S.chunk_id.is_(None)
    q = (
        select(_C.id, _C.step_min, _C.n, fresh, *payload)
        .select_from(Chunk.__table__.outerjoin(ChunkSummary.__table__, _S.chunk_id == _C.id))
        .where(_C.series_id == series_id, _C.segment == segment, _C.n < TARGET)
    )
    if last_final is not None:
        q = q.where(_C.id > last_final)
    out = []
    for cid, step_min, n, is_fresh, steps, values, times in session.execute(q.order_by(_C.id)):
        if pg:
            arrays = (pg_array(steps, "i8"), pg_array(values, "f8"), pg_array(times, "f8"))
        else:
            arrays = (
                decode_steps(steps, step_min, n),
                decode_floats(values, n),
                decode_floats(times, n),
            )
        out.append((cid, (segment, *arrays), bool(is_fresh)))
    return out


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


def compact_many(
    sessions: sessionmaker[Session],
    keys: Iterable[tuple[int, int]],
    *,
    min_chunks: int = MERGE_CHUNKS,
    lock: contextlib.AbstractContextManager | None = None,
    fresh_only: bool = False,
) -> int:
    """compact_series for each (series_id, segment) of `keys`, GROUP of them a transaction.

    The reads, merges, summaries and compression happen before the lock is taken; the
    transaction only deletes and inserts. Each series' swap runs in a savepoint, so one that
    another process compacted meanwhile is skipped without undoing the others.
    """
    merged = 0
    keys = list(keys)
    for i in range(0, len(keys), GROUP):
        plans = [
            plan
            for sid, seg in keys[i : i + GROUP]
            if (plan := _plan(sessions, sid, seg, min_chunks, fresh_only)) is not None
        ]
        if not plans:
            continue
        with lock or contextlib.nullcontext(), sessions() as session:
            for ids, new, summaries in plans:
                swap = session.begin_nested()
                gone = session.execute(delete(Chunk).where(_C.id.in_(ids))).rowcount
                if gone != len(ids):
                    swap.rollback()  # someone else compacted these meanwhile
                    continue
                insert_chunks(session, new, with_id=True)
                session.execute(insert(ChunkSummary), summaries)
                swap.commit()
                merged += len(ids)
            session.commit()
    return merged


def _plan(
    sessions: sessionmaker[Session], series_id: int, segment: int, min_chunks: int, fresh_only: bool
) -> tuple[list[int], list[tuple], list[dict]] | None:
    """(ids to delete, merged chunk rows, their summaries) of one series-segment, or None."""
    with sessions() as session:
        rows = _suffix(session, series_id, segment)
        if fresh_only:
            first = len(rows)
            while first > 0 and rows[first - 1][2]:
                first -= 1
            rows = rows[first:]
        if len(rows) < max(2, min_chunks):
            return None
        pg = is_pg(session)
        steps, values, times = merge_parts([parts for _, parts, _ in rows])
    ids = [cid for cid, _, _ in rows]
    pieces = max(1, len(steps) // TARGET)  # pieces of TARGET..2*TARGET points
    bounds = np.linspace(0, len(steps), pieces + 1).astype(int)
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


def compact_all(
    sessions: sessionmaker[Session], *, run: str | None = None, min_chunks: int = 2, lock=None
) -> int:
    """Compact every series-segment (of `run`, or of all runs) with min_chunks small chunks."""
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


class Compactor:
    """Counts the chunks ingest writes per (series, segment) and merges them in the background.

    It works when ingest has been quiet for `idle_s` (compression is CPU the ingest path
    would otherwise compete for) or when `max_wait_s` has passed since the first due work.
    After `deep_idle_s` of quiet it also merges the fresh chunks (2+) of every series it saw
    (fresh_only: already merged ones are not rewritten), so that a run that stops or pauses
    ends up compacted.
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
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_ingest = 0.0
        self._due_since: float | None = None
        self._thread: threading.Thread | None = None

    def touch(self, series_ids: Iterable[int], segment: int) -> None:
        """Ingest wrote one chunk for each of series_ids in segment."""
        now = time.monotonic()
        with self._mutex:
            self._last_ingest = now
            for sid in series_ids:
                key = (sid, segment)
                self._touched.add(key)
                n = self._counts.get(key, 0) + 1
                if n >= MERGE_CHUNKS:
                    self._due.add(key)
                    n = 0
                    if self._due_since is None:
                        self._due_since = now
                        self._wake.set()
                self._counts[key] = n

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="logitwatch-compactor", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _take(self) -> tuple[list[tuple[int, int]], bool] | None:
        """(keys, deep) to compact if it is time, else None."""
        with self._mutex:
            self._wake.clear()  # wake again on new work; else look every idle_s
            quiet_for = time.monotonic() - self._last_ingest
            if self._due:
                overdue = (
                    self._due_since is not None
                    and time.monotonic() - self._due_since >= self._max_wait_s
                )
                if quiet_for >= self._idle_s or overdue:
                    work, self._due, self._due_since = sorted(self._due), set(), None
                    return work, False
            elif self._touched and quiet_for >= self._deep_idle_s:
                work, self._touched = sorted(self._touched), set()
                return work, True
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self._idle_s)
            work, deep = self._take() or ((), False)
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
                    )
                except Exception:  # a failed merge leaves the chunks as they were
                    log.exception("compaction of series-segments %s failed", work[i : i + GROUP])
            if merged:
                try:
                    release_space(self._sessions, lock=self._lock)
                except Exception:
                    log.exception("releasing free pages failed")
