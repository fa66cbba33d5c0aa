"""The work behind POST points: each request's batch stored and evaluated in a group commit.

Requests are decoded and packed on their own (no lock, no database); the group committer's
one thread then stores many of them, runs the rules over each and reads the runs' firing
alerts in one transaction, and answers each request after that transaction commits.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from logitwatch.protocol import Batch
from logitwatch.service.api.layouts import Layouts
from logitwatch.service.rules.alerts import with_links
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.settings import Settings
from logitwatch.service.store import IngestResult, Prepared, check_run_quota
from logitwatch.service.store.compact import Compactor
from logitwatch.service.store.db import GroupCommit, Writer

__all__ = ["Ingest"]


@dataclass(slots=True)
class _Done:
    run: str
    result: IngestResult
    alerts: list[dict[str, Any]] | None = None


class Ingest:
    """Stores batches through one GroupCommit; ``await ingest.store(run, batch, prepared)``.

    >>> ingest = Ingest(writer, rules, compactor)  # doctest: +SKIP
    >>> ingest.start(); answer = await ingest.store(settings, "r", batch, prepared)  # doctest: +SKIP
    """

    def __init__(self, writer: Writer, rules: RuleEngine, compactor: Compactor) -> None:
        self._rules = rules
        self._compactor = compactor
        self.group = GroupCommit(writer, finish=self._finish)
        #: prepare_batch packs for the database's dialect.
        self.postgres = writer.sessionmaker.kw["bind"].dialect.name == "postgresql"
        #: Each run's one-step report layout (decoded on the event loop only).
        self.layouts = Layouts()

    def start(self) -> None:
        self.group.start()

    def close(self) -> None:
        self.group.close()

    async def store(
        self, settings: Settings, run: str, batch: Batch, prepared: Prepared
    ) -> dict[str, Any]:
        """Store and evaluate `batch` once; the answer the endpoint returns, after commit."""

        def job(session: Session) -> _Done:
            check_run_quota(session, run=run, max_runs=settings.max_runs)
            result = self._rules.ingest(
                session,
                run=run,
                batch=batch,
                prepared=prepared,
                max_series=settings.max_series_per_run,
            )
            return _Done(run, result)

        done: _Done = await asyncio.wrap_future(self.group.submit(job, order=run))
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

    def _finish(self, session: Session, done: list[_Done]) -> list[_Done]:
        """Every answer's firing alerts, with one query for the whole group."""
        firing = self._rules.firing_of(session, {d.result.run_id: d.run for d in done})
        for d in done:
            d.alerts = [dict(a) for a in firing.get(d.result.run_id, [])]
        return done
