"""The rule engine: runs every rule over each ingested batch, per series and in step order.

Verdicts that change nothing but a window are settled for all the batch's series at once
(vector.py); the rest go point by point (job.py).

Each (run, series) keeps every rule's memory in a rule_state row (growth windows: one row per
(run, rule), windows.py), read and written inside the ingest transaction while the run's row
is locked (SELECT ... FOR NO KEY UPDATE on PostgreSQL; the single writer on SQLite), so
several service processes and a restart neither lose state nor fire twice. Points at or
before a series' last step are ignored (late or replayed batches). Between batches each
process keeps the rows in memory, used while the run's rule-state epoch is unchanged
(state.py); the user rules' version is read once per transaction.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.protocol import Batch
from logitwatch.service.rules import alerts as al
from logitwatch.service.rules import vector
from logitwatch.service.rules.builtin import builtin_rules
from logitwatch.service.rules.conditions import RunContext
from logitwatch.service.rules.job import BatchJob, Restarts
from logitwatch.service.rules.model import Rule
from logitwatch.service.rules.notify import Notifier
from logitwatch.service.rules.state import RUN_BY_NAME_PG, UNREAD, StateRows
from logitwatch.service.rules.user import effective_rules, get_user_rules, user_rules_version
from logitwatch.service.rules.warmup import infer_warmup
from logitwatch.service.store.deferred import driver_rows, pg_rows
from logitwatch.service.store.ingest import (
    IngestResult,
    Prepared,
    Shape,
    ingest_batch,
    series_columns,
)
from logitwatch.service.store.models import Run, utcnow
from logitwatch.service.store.ondemand import OnDemand
from logitwatch.service.store.rule_tables import Alert
from logitwatch.service.store.sql import is_pg, labels_key
from logitwatch.service.store.worker import Worker

__all__ = ["RuleEngine", "lock_statements"]


class RuleEngine:
    """Built-in and user rules over each batch; alerts in the database; webhooks on changes.

    >>> engine = RuleEngine(None)  # doctest: +SKIP
    >>> engine.on_batch(session, run="r", batch=batch); engine.firing(session, run="r")
    """

    def __init__(
        self,
        sm: sessionmaker[Session] | None,
        *,
        notifier: Notifier | None = None,
        builtins: bool = True,
        absent_interval_s: float = 15.0,
        absent_horizon_s: float = 86_400.0,
        lock: Any = None,
    ) -> None:
        self._sm = sm
        #: The process's writer lock (Writer.lock): the absent check's writes take it.
        self._writer_lock = lock
        self.notifier = notifier or Notifier(sm, urls=[])
        self._builtin = builtin_rules() if builtins else []
        self._rules = list(self._builtin)
        self._version = -1
        self._lock = threading.Lock()
        self.absent_interval_s = absent_interval_s
        self.absent_horizon_s = absent_horizon_s
        self._stop = threading.Event()
        self._absent = Worker("logitwatch-absent", self._loop, self._stop)
        self._layouts: dict[tuple, vector.Layout | None] = {}
        self._contexts: dict[str, RunContext] = {}

    # --- rules ------------------------------------------------------------------------

    def rules(self, session: Session) -> list[Rule]:
        """The effective rules, reloaded when another process (or PUT) changed the user rules.

        The version is read once per transaction (a group commit carries many batches).
        """
        version = session.info.get(_VERSION_SEEN)
        if version is None or session.info.get(_VERSION_TX) is not session.get_transaction():
            version = user_rules_version(session)
            self.saw_version(session, version)
        if version != self._version:
            _, user, _ = get_user_rules(session)
            with self._lock:
                self._rules = effective_rules(self._builtin, user)
                self._version = version
        return self._rules

    @staticmethod
    def saw_version(session: Session, version: int) -> None:
        """The user rules' version as this transaction read it (``rules`` reads it itself
        unless told here: api/ingest.py sends it ahead with a group's other reads)."""
        session.info[_VERSION_SEEN] = version
        session.info[_VERSION_TX] = session.get_transaction()

    def context(self, config: Any) -> RunContext:
        """The run's RunContext, kept per distinct config (its JSON text on SQLite)."""
        key = config if isinstance(config, str) else json.dumps(config, sort_keys=True)
        ctx = self._contexts.get(key)
        if ctx is None:
            if len(self._contexts) > 10_000:
                self._contexts.clear()
            parsed = json.loads(config) if isinstance(config, str) else config
            ctx = self._contexts[key] = RunContext.from_config(parsed)
        return ctx

    @property
    def builtin(self) -> list[Rule]:
        return list(self._builtin)

    # --- per batch --------------------------------------------------------------------

    def _layout(self, rules: list[Rule], series: list, shape: Shape | None) -> vector.Layout | None:
        """The batch's layout (vector.py), cached per rule set and series in order (the
        batch's Shape when its decoder knew it: the same pairs, hashed once)."""
        if shape is not None:
            key: tuple = (id(rules), shape)
        else:
            key = (id(rules), *[(s.metric, k) for s, _, k in series])
        lay = self._layouts.get(key, False)
        if lay is False or (lay is not None and lay.rules is not rules):
            if len(self._layouts) > 10_000:
                self._layouts.clear()
            lay = self._layouts[key] = vector.layout(
                rules, [(s.metric, s.labels, k) for s, _, k in series]
            )
        return lay

    def ingest(
        self,
        session: Session,
        *,
        run: str,
        batch: Batch,
        prepared: Prepared,
        max_series: int = 100_000,
        marked: bool | None = None,
        locked: tuple[list, list] | None = None,
    ) -> IngestResult:
        """Store ``batch`` and, unless it was stored before, evaluate it: what every batch
        goes through, in the ingest route's group commit and in a backtest's replay.
        ``marked`` and ``locked``: what the caller read ahead in this transaction
        (store.mark_statements, lock_statements)."""
        result = ingest_batch(
            session, run=run, batch=batch, max_series=max_series, prepared=prepared, marked=marked
        )
        if not result.duplicate:
            # The arrays the store just wrote, sorted and de-duplicated once for both.
            self.on_batch(session, run=run, batch=batch, prepared=prepared, locked=locked)
        return result

    def on_batch(
        self,
        session: Session,
        *,
        run: str,
        batch: Batch,
        prepared: Prepared | None = None,
        locked: tuple[list, list] | None = None,
    ) -> None:
        """Evaluate the batch (the caller has stored it and commits afterwards).

        `prepared` (from store.prepare_batch) carries the series' sorted, de-duplicated
        arrays the store wrote; without it they are made here by the same function.
        `locked`: the rows of lock_statements(run), when the caller sent them in this
        transaction.
        """
        if prepared is not None and len(prepared.columns) != len(batch.series):
            raise ValueError("prepared was made from another batch")
        run_row, state_row = _lock_run(session, run, locked)
        rules = self.rules(session)
        columns = (
            prepared.columns if prepared is not None else [series_columns(s) for s in batch.series]
        )
        lkeys = prepared.keys if prepared is not None and prepared.keys else None
        if lkeys is None:
            lkeys = [labels_key(s.labels) for s in batch.series]
        shape = prepared.shape if prepared is not None else None
        at: Sequence[int] = range(len(columns))  # the non-empty series
        if prepared is not None and prepared.points is not None:
            steps = [prepared.points.steps]  # one point a series: none empty
        else:
            steps = [c.steps for c in columns]
            if 0 in map(len, steps):
                at, shape = [i for i, s in enumerate(steps) if len(s)], None
        # (Series, Columns, labels_key) of each non-empty series, made where read: a
        # report's (api/layouts.py) are made only for the series a rule looks at one by one.
        series = OnDemand(len(at), lambda j: (batch.series[at[j]], columns[at[j]], lkeys[at[j]]))
        if not series or not rules:
            return
        ctx = self.context(run_row.config)
        upto = int(np.concatenate(steps).max())
        lay = self._layout(rules, series, shape)
        if lay is None:
            return
        rows = StateRows(session, run_row.id, batch.segment)
        rows.load(lay.keys, lay.growth, state_row)
        # from the lr series when none is declared
        ctx = infer_warmup(ctx, rows, [series[i][1] for i in lay.lr], upto)
        job = BatchJob(self, session, run_row, batch, ctx, Restarts(ctx, upto), rows)
        one = prepared.points if prepared is not None else None  # a report's: one point each
        pos = lay.pos
        vector.evaluate(job, lay, OnDemand(len(pos), lambda j: series[pos[j]][:2]), one)
        for rule in lay.absent:
            job.saw_data(rule, upto)
        rows.save()

    def firing(self, session: Session, *, run: str) -> list[dict[str, Any]]:
        run_id = session.scalar(select(Run.id).where(Run.name == run))
        return [] if run_id is None else al.firing(session, run_id=run_id, run=run)

    def firing_of(self, session: Session, runs: dict[int, str]) -> dict[int, list[dict[str, Any]]]:
        """Each run's firing, unsilenced alerts (run id -> alert dicts), in one query."""
        if not runs or not _any_firing(session, sorted(runs)):
            return {}
        alerts = session.scalars(
            select(Alert)
            .where(Alert.run_id.in_(sorted(runs)), Alert.state == "firing")
            .order_by(Alert.id)
        ).all()
        out: dict[int, list[dict[str, Any]]] = {}
        if alerts:
            silences = al.active_silences(session)
            for a in alerts:
                name = runs[a.run_id]
                if not al.is_silenced(silences, a, name):
                    out.setdefault(a.run_id, []).append(al.alert_dict(a, name))
        return out

    # --- periodic: runs that stopped reporting ----------------------------------------

    def check_absent(self, now=None) -> int:
        """Fire absent rules whose data stopped; returns the number of alerts opened."""
        from logitwatch.service.rules.absence import check_absent

        assert self._sm is not None
        return check_absent(self, self._sm, now=now or utcnow(), lock=self._writer_lock)

    def start(self) -> None:
        """Start the notifier and the absent checker (idempotent)."""
        self.notifier.start()
        if self._sm is not None:
            self._absent.start()

    def close(self) -> None:
        self._absent.close()
        self.notifier.close()

    def _loop(self) -> None:
        import logging

        while not self._stop.wait(self.absent_interval_s):
            try:
                self.check_absent()
            except Exception:  # keep checking; the database may come back
                logging.getLogger("logitwatch.service.rules").exception("absent check failed")


class _RunRow(NamedTuple):
    id: int
    name: str
    config: Any  # JSON text on SQLite, a dict on PostgreSQL


_VERSION_SEEN = "rules_version"
_VERSION_TX = "rules_version_tx"
_RUN_SQLITE = "SELECT id, config FROM runs WHERE name = ?"
# One evaluator per run at a time, across processes. NO KEY UPDATE (what ingest's UPDATE of
# last_seen_at already holds) does not conflict with the KEY SHARE locks that other
# transactions' foreign keys take on the run row, so no deadlock.
_RUN_PG = "SELECT id, config FROM runs WHERE name = %s FOR NO KEY UPDATE"


_FIRING = "SELECT 1 FROM alerts WHERE state = 'firing' AND run_id {} LIMIT 1"
_FIRING_PG = _FIRING.format("= ANY(%s)")


def _any_firing(session: Session, run_ids: list[int]) -> bool:
    """Whether any of the runs has a firing alert: one driver-level query on the
    (state, run_id) index, so that the usual answer (none) skips the ORM's query, which cost
    ~0.7 ms a group commit, measured. The session is flushed first: an alert the rules
    changed in this transaction is seen as the ORM query would see it."""
    session.flush()
    sqlite = _FIRING.format(f"IN ({', '.join('?' * len(run_ids))})")
    return bool(driver_rows(session, (_FIRING_PG, (run_ids,)), (sqlite, run_ids)))


def lock_statements(run: str) -> list[tuple[str, tuple]]:
    """PostgreSQL: the rule engine's first reads of a run, its row and its own rule_state
    row, each locked, as (sql, params): a caller may send them ahead with other statements
    in one round trip (api/ingest.py) and pass their rows to on_batch's ``locked``."""
    return [(_RUN_PG, (run,)), (RUN_BY_NAME_PG, (run,))]


def _lock_run(session: Session, run: str, locked: tuple[list, list] | None) -> tuple[_RunRow, Any]:
    """The run's row, locked; on PostgreSQL also its own rule_state row (locked, or None),
    read in the same round trip (StateRows.load's ``run_row``; elsewhere it reads it)."""
    if locked is None and is_pg(session):
        locked = pg_rows(session, *lock_statements(run))
    if locked is not None:
        found, state = locked
        state_row = state[0] if state else None
    else:
        found = driver_rows(session, (_RUN_PG, (run,)), (_RUN_SQLITE, (run,)))
        state_row = UNREAD
    if not found:
        raise LookupError(f"run {run!r} does not exist")
    return _RunRow(found[0][0], run, found[0][1]), state_row
