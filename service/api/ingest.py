"""The work behind POST points: each request's batch stored and evaluated in a group commit.

Requests are decoded and packed on their own (no lock, no database); a group of them is then
stored in one transaction, the rules run over each and the runs' firing alerts read, and each
request is answered after that transaction commits. The group committer's thread does it on
PostgreSQL, and for big batches; on SQLite the event loop stores small batches itself, a group
each loop iteration (_LoopGroup). On PostgreSQL the reads each request's work starts with are
sent for the whole group in one round trip first (Ingest._begin).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from logitwatch.protocol import Batch
from logitwatch.service.api.layouts import Layouts
from logitwatch.service.rules.alerts import with_links
from logitwatch.service.rules.engine import RuleEngine, lock_statements
from logitwatch.service.rules.user import version_of, version_statement
from logitwatch.service.settings import Settings
from logitwatch.service.store import IngestResult, Prepared, check_run_quota
from logitwatch.service.store.compact import Compactor
from logitwatch.service.store.db import GroupCommit, Writer
from logitwatch.service.store.deferred import pg_rows
from logitwatch.service.store.ingest import batch_points, mark_statements
from logitwatch.service.store.sql import cache

__all__ = ["Ingest"]


@dataclass(slots=True)
class _Done:
    run: str
    result: IngestResult
    alerts: list[dict[str, Any]] | None = None


@dataclass(slots=True, eq=False)
class _Job:
    """One request's batch: stored and evaluated in the group's transaction (``__call__``)."""

    rules: RuleEngine
    settings: Settings
    run: str
    batch: Batch
    prepared: Prepared
    #: (marked, locked): what Ingest._begin read ahead for it in this transaction.
    ahead: tuple[bool, tuple[list, list] | None] | None = None

    def __call__(self, session: Session) -> _Done:
        check_run_quota(session, run=self.run, max_runs=self.settings.max_runs)
        marked, locked = self.ahead or (None, None)
        result = self.rules.ingest(
            session,
            run=self.run,
            batch=self.batch,
            prepared=self.prepared,
            max_series=self.settings.max_series_per_run,
            marked=marked,
            locked=locked,
        )
        return _Done(self.run, result)


#: How long the event loop waits for the writer lock before it hands its group to the
#: committer's thread: the usual holds (a run's flush, the checkpointer's last pass) take a
#: few ms; handing over at once sent ~40 % of a paced fleet's groups to the thread (two
#: threads at the GIL again: 1.63 -> 1.86 ms a request), measured.
LOOP_WAIT_S = 0.01


def _settle_from(future: asyncio.Future, source: Any) -> None:
    """Settle ``future`` (the loop's) as the concurrent future ``source`` settles."""

    def done(w: asyncio.Future) -> None:
        if future.done():  # cancelled meanwhile
            return
        if w.cancelled():
            future.cancel()
        elif w.exception() is not None:
            future.set_exception(w.exception())
        else:
            future.set_result(w.result())

    asyncio.wrap_future(source).add_done_callback(done)


class _LoopGroup:
    """SQLite: small batches stored by the event loop itself, one group a loop iteration.

    A request's handler queues its job and awaits; the first job of an iteration schedules
    ``_run`` behind the handlers already ready, so the requests the loop read together make
    one group. On SQLite the writer is one at a time anyway, and handing each group to a
    thread and its answers back cost more than the work: two threads taking turns at the
    GIL, a wake-up each way, the caches of one thrashed by the other. In one process
    without HTTP (200 runs, 8 clients, alternated three times each): 1.33-1.44 -> 0.95-1.06
    ms of CPU a request, 747-809 -> 972-1,086 requests/s, measured. A group holds at most ``max_jobs`` (the loop answers nothing while
    it runs); the rest go in the next iteration. The loop waits at most LOOP_WAIT_S for the
    writer lock: while another writer holds it longer (a deep compaction), the group goes
    to the committer's thread. Big batches, decoded off the loop, go there too, so the loop
    never stores one.
    """

    def __init__(self, group: GroupCommit, thread: GroupCommit, lock: Any, max_jobs: int = 64):
        self._group = group
        #: The committer's thread, and the writer lock: a group the loop would wait for
        #: longer than LOOP_WAIT_S (another writer holds the lock) goes to the thread.
        self._thread = thread
        self._lock = lock
        self._max_jobs = max_jobs
        self._queue: list[tuple[str, _Job, asyncio.Future]] = []
        self._scheduled = False

    def submit(self, job: _Job, order: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((order, job, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._run)
        return future

    def _run(self) -> None:
        self._scheduled = False
        work, self._queue = self._queue[: self._max_jobs], self._queue[self._max_jobs :]
        if self._queue:  # the rest after what else the loop has to do
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)
        if self._lock.acquire(timeout=LOOP_WAIT_S):
            self._lock.release()  # free, or freed within LOOP_WAIT_S: the loop stores it
        else:  # a long hold (a deep compaction): the thread waits instead of the loop
            for order, job, future in work:
                try:
                    _settle_from(future, self._thread.submit(job, order=order))
                except Exception as exc:  # the thread is not running: never leave one waiting
                    future.set_exception(exc)
            return
        self.run(work)

    def run(self, work: list[tuple[str, _Job, asyncio.Future]]) -> None:
        work = sorted((w for w in work if not w[2].cancelled()), key=lambda w: w[0])
        try:
            results = self._group.run([job for _, job, _ in work])
        except Exception as exc:  # never leave a request waiting
            results = [(False, exc)] * len(work)
        for (_, _, future), (ok, answer) in zip(work, results, strict=True):
            if future.cancelled():
                continue
            if ok:
                future.set_result(answer)
            else:
                future.set_exception(answer)

    def close(self) -> None:
        """Store what is still queued, then drop the kept session."""
        work, self._queue = self._queue, []
        if work:
            self.run(work)
        self._group.close_session()


class Ingest:
    """Stores batches through one GroupCommit; ``await ingest.store(run, batch, prepared)``.

    >>> ingest = Ingest(writer, rules, compactor)  # doctest: +SKIP
    >>> ingest.start(); answer = await ingest.store(settings, "r", batch, prepared)  # doctest: +SKIP
    """

    def __init__(self, writer: Writer, rules: RuleEngine, compactor: Compactor) -> None:
        self._rules = rules
        self._compactor = compactor
        self.group = GroupCommit(writer, begin=self._begin, finish=self._finish)
        #: prepare_batch packs for the database's dialect.
        self.postgres = writer.sessionmaker.kw["bind"].dialect.name == "postgresql"
        #: SQLite: small batches are stored on the event loop (_LoopGroup).
        self._on_loop = (
            None
            if self.postgres
            else _LoopGroup(
                GroupCommit(writer, begin=self._begin, finish=self._finish), self.group, writer.lock
            )
        )
        #: Each run's one-step report layout (decoded on the event loop only).
        self.layouts = Layouts()

    def start(self) -> None:
        self.group.start()

    def close(self) -> None:
        if self._on_loop is not None:
            self._on_loop.close()
        self.group.close()

    async def store(
        self, settings: Settings, run: str, batch: Batch, prepared: Prepared, small: bool = False
    ) -> dict[str, Any]:
        """Store and evaluate `batch` once; the answer the endpoint returns, after commit.
        ``small``: a batch decoded on the event loop (on SQLite the loop stores it too)."""
        job = _Job(self._rules, settings, run, batch, prepared)
        if small and self._on_loop is not None:
            done: _Done = await self._on_loop.submit(job, run)
        else:
            done = await asyncio.wrap_future(self.group.submit(job, order=run))
        result = done.result
        if not result.duplicate:
            if result.flushed:
                self._compactor.touch_chunks(result.flushed)
            if result.report:
                self._compactor.touch_report(result.run_id)
            else:
                self._compactor.touch(result.series_ids, batch.segment)
        alerts = with_links(done.alerts or [], settings.dashboard_url)
        return {"accepted": result.n_points, "duplicate": result.duplicate, "alerts": alerts}

    def _begin(self, session: Session, jobs: list[_Job]) -> None:
        """PostgreSQL: the reads every job of the group starts with, in one round trip
        instead of two a job: each batch's record (store.mark_statements) and, for the
        first job of each run, the rule engine's locks and reads (lock_statements). They go
        in the jobs' order (by run name), so the run rows are locked in the order the jobs
        would lock them. A later job of a run goes the plain way, its reads after what the
        earlier one writes; so do a run this process has no id of yet (a new run) and every
        job after it, whose run rows must not be locked before the new run's. The user
        rules' version, which the rule engine reads once a transaction, goes with them."""
        for job in jobs:
            job.ahead = None
        if not self.postgres:
            return
        known = cache(session)
        statements: list[tuple[str, tuple]] = []
        plan: list[tuple[_Job, int, bool]] = []
        runs: set[str] = set()
        for job in jobs:
            run_id = known.get(("run", job.run))
            if run_id is None:
                break
            first = job.run not in runs
            runs.add(job.run)
            plan.append((job, len(statements), first))
            statements += mark_statements(run_id, job.batch, batch_points(job.batch, job.prepared))
            if first:
                statements += lock_statements(job.run)
        if not plan:
            return
        rows = pg_rows(session, *statements, version_statement())
        for job, at, first in plan:
            job.ahead = (bool(rows[at + 1]), (rows[at + 2], rows[at + 3]) if first else None)
        self._rules.saw_version(session, version_of(rows[-1]))

    def _finish(self, session: Session, done: list[_Done]) -> list[_Done]:
        """Every answer's firing alerts, with one query for the whole group."""
        firing = self._rules.firing_of(session, {d.result.run_id: d.run for d in done})
        for d in done:
            d.alerts = [dict(a) for a in firing.get(d.result.run_id, [])]
        return done
