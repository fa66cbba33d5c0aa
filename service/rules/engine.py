"""The rule engine: runs every rule over each ingested batch, per series and in step order.

Each (run, series) keeps every rule's memory in a rule_state row, read and written inside the
ingest transaction while the run's row is locked (SELECT ... FOR NO KEY UPDATE on PostgreSQL;
the single writer on SQLite), so several service processes and a restart neither lose state
nor fire twice. Points at or before a series' last step are ignored (late or replayed batches).
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.protocol import Batch
from logitwatch.service.rules import alerts as al
from logitwatch.service.rules.builtin import builtin_rules
from logitwatch.service.rules.conditions import RunContext, batch_bounds, quiet
from logitwatch.service.rules.job import BatchJob, Restarts
from logitwatch.service.rules.model import Rule
from logitwatch.service.rules.notify import Notifier
from logitwatch.service.rules.state import Points, StateRows
from logitwatch.service.rules.user import effective_rules, get_user_rules, user_rules_version
from logitwatch.service.store.ingest import Prepared, series_columns
from logitwatch.service.store.models import Run, utcnow
from logitwatch.service.store.sql import is_pg, labels_key

__all__ = ["RuleEngine"]


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
    ) -> None:
        self._sm = sm
        self.notifier = notifier or Notifier(sm, urls=[])
        self._builtin = builtin_rules() if builtins else []
        self._rules = list(self._builtin)
        self._version = -1
        self._lock = threading.Lock()
        self.absent_interval_s = absent_interval_s
        self.absent_horizon_s = absent_horizon_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._plans: dict[tuple, tuple[list[Rule], list[Rule], list[Rule]]] = {}

    # --- rules ------------------------------------------------------------------------

    def rules(self, session: Session) -> list[Rule]:
        """The effective rules, reloaded when another process (or PUT) changed the user rules."""
        version = user_rules_version(session)
        if version != self._version:
            _, user, _ = get_user_rules(session)
            with self._lock:
                self._rules = effective_rules(self._builtin, user)
                self._version = version
        return self._rules

    @property
    def builtin(self) -> list[Rule]:
        return list(self._builtin)

    # --- per batch --------------------------------------------------------------------

    def _plan(self, rules: list[Rule], metric: str, labels: dict[str, str], lkey: str):
        """(ungated, gated, absent) rules that select one series; cached per rule set."""
        key = (id(rules), metric, lkey)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 200_000:
                self._plans.clear()
            hit = [r for r in rules if r.matches(metric, labels)]
            plan = (
                [r for r in hit if r.condition.kind != "absent" and r.preceded_by is None],
                [r for r in hit if r.condition.kind != "absent" and r.preceded_by is not None],
                [r for r in hit if r.condition.kind == "absent"],
            )
            self._plans[key] = plan
        return plan

    def on_batch(
        self, session: Session, *, run: str, batch: Batch, prepared: Prepared | None = None
    ) -> None:
        """Evaluate the batch (the caller has stored it and commits afterwards).

        `prepared` (from store.prepare_batch) carries the series' sorted, de-duplicated
        arrays the store wrote; without it they are made here by the same function.
        """
        if prepared is not None and len(prepared.columns) != len(batch.series):
            raise ValueError("prepared was made from another batch")
        t = Run.__table__  # Core, not the ORM entity: a cheaper statement on every batch
        q = select(t.c.id, t.c.name, t.c.config).where(t.c.name == run)
        if is_pg(session):
            # One evaluator per run at a time, across processes. NO KEY UPDATE (what ingest's
            # UPDATE of last_seen_at already holds) does not conflict with the KEY SHARE locks
            # that other transactions' foreign keys take on the run row, so no deadlock.
            q = q.with_for_update(key_share=True)  # renders FOR NO KEY UPDATE
        run_row = session.execute(q).one()
        rules = self.rules(session)
        columns = (
            prepared.columns if prepared is not None else [series_columns(s) for s in batch.series]
        )
        series = [(s, c) for s, c in zip(batch.series, columns, strict=True) if len(c.steps)]
        if not series or not rules:
            return
        ctx = RunContext.from_config(run_row.config)
        upto = max(int(c.steps[-1]) for _, c in series)  # steps are sorted
        plans = []
        for s, c in series:
            lkey = labels_key(s.labels)
            plan = self._plan(rules, s.metric, s.labels, lkey)
            plans.append((s, c, f"{s.metric}{{{lkey}}}", plan))
        plans = [p for p in plans if any(p[3])]
        if not plans:
            return
        rows = StateRows(session, run_row.id, batch.segment)
        rows.load([key for _, _, key, plan in plans if plan[0] or plan[1]])
        job = BatchJob(self, session, run_row, batch, ctx, Restarts(ctx, upto), rows)
        todo = []
        for s, c, key, (ungated, gated, _) in plans:
            if ungated or gated:
                todo.append((s, job.points(key, c.steps, c.values), ungated, gated))
        # One pass over the whole batch tells which series no threshold can touch.
        fresh = [pts for _, pts, _, _ in todo if len(pts.values)]
        if fresh:
            for pts, b in zip(fresh, batch_bounds([p.values for p in fresh]), strict=True):
                pts.bounds = b
        # Rules gated on another rule's triggers run last, so this batch's triggers count.
        for s, pts, ungated, _ in todo:
            for rule in ungated:
                if not _idle(rule, pts, ctx):
                    job.run_rule(rule, s, pts)
        for s, pts, _, gated in todo:
            for rule in gated:
                if not _idle(rule, pts, ctx):
                    job.run_rule(rule, s, pts)
        absent = {r.name: r for _, _, _, plan in plans for r in plan[2]}
        for rule in absent.values():
            job.saw_data(rule, upto)
        rows.save()

    def firing(self, session: Session, *, run: str) -> list[dict[str, Any]]:
        run_id = session.scalar(select(Run.id).where(Run.name == run))
        return [] if run_id is None else al.firing(session, run_id=run_id, run=run)

    # --- periodic: runs that stopped reporting ----------------------------------------

    def check_absent(self, now=None) -> int:
        """Fire absent rules whose data stopped; returns the number of alerts opened."""
        from logitwatch.service.rules.absence import check_absent

        assert self._sm is not None
        return check_absent(self, self._sm, now=now or utcnow())

    def start(self) -> None:
        """Start the notifier and the absent checker (idempotent)."""
        self.notifier.start()
        if self._thread is None and self._sm is not None:
            self._thread = threading.Thread(
                target=self._loop, name="logitwatch-absent", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.notifier.close()

    def _loop(self) -> None:
        import logging

        while not self._stop.wait(self.absent_interval_s):
            try:
                self.check_absent()
            except Exception:  # keep checking; the database may come back
                logging.getLogger("logitwatch.service.rules").exception("absent check failed")


def _idle(rule: Rule, pts: Points, ctx: RunContext) -> bool:
    """Nothing to do: the rule holds no memory of the series and no new point reaches its
    level (most thresholds on most batches), so its verdicts are all "no" and change nothing."""
    return (
        pts.bounds is not None
        and rule.name not in pts.row.state
        and quiet(rule.condition, pts.bounds, ctx)
    )
