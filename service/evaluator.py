"""The rule engine: runs every rule over each ingested batch, per series and in step order.

Each (run, rule, series) keeps its memory in a rule_state row, read and written inside the
ingest transaction while the run's row is locked (SELECT ... FOR UPDATE on PostgreSQL; the
single writer on SQLite), so several service processes and a restart neither lose state nor
fire twice. Points at or before a state's last step are ignored (late or replayed batches).
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.protocol import Batch, Series
from logitwatch.service import alerts as al
from logitwatch.service.conditions import RunContext, Verdict, evaluate, reset_windows
from logitwatch.service.models import Run, utcnow
from logitwatch.service.models_rules import Alert, RuleState
from logitwatch.service.notify import Notifier
from logitwatch.service.rules import Rule
from logitwatch.service.rules_builtin import builtin_rules
from logitwatch.service.rules_store import effective_rules, get_user_rules, user_rules_version
from logitwatch.service.store_sql import is_pg, labels_key

__all__ = ["RuleEngine"]

#: A trigger step list per state, for ``preceded_by`` look-ups.
_MAX_TRIGGERS = 8


class _Restarts:
    """Scheduled SGDR restarts up to the batch's last step, searched by bisection."""

    def __init__(self, ctx: RunContext, upto: int) -> None:
        self.steps = ctx.restarts(-1, upto)

    def crossed(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self.steps, lo)
        return i < len(self.steps) and self.steps[i] <= hi

    def last(self, step: int) -> int | None:
        i = bisect.bisect_right(self.steps, step)
        return self.steps[i - 1] if i else None


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

    def on_batch(self, session: Session, *, run: str, batch: Batch) -> None:
        """Evaluate the batch (the caller has stored it and commits afterwards)."""
        q = select(Run).where(Run.name == run)
        if is_pg(session):
            # One evaluator per run at a time, across processes. NO KEY UPDATE (what ingest's
            # UPDATE of last_seen_at already holds) does not conflict with the KEY SHARE locks
            # that other transactions' foreign keys take on the run row, so no deadlock.
            q = q.with_for_update(key_share=True)  # renders FOR NO KEY UPDATE
        run_row = session.scalars(q).one()
        rules = self.rules(session)
        series = [s for s in batch.series if len(s.steps)]
        if not series or not rules:
            return
        ctx = RunContext.from_config(run_row.config)
        upto = max(max(s.steps) for s in series)
        job = _Job(self, session, run_row, batch, ctx, _Restarts(ctx, upto))
        work: list[tuple[Rule, Series, str]] = []
        absent: list[Rule] = []
        for rule in rules:
            matched = [s for s in series if rule.matches(s.metric, s.labels)]
            if not matched:
                continue
            if rule.condition.kind == "absent":
                absent.append(rule)
                continue
            work += [(rule, s, f"{s.metric}{{{labels_key(s.labels)}}}") for s in matched]
        # Rules gated on another rule's triggers run last, so this batch's triggers count.
        work.sort(key=lambda w: w[0].preceded_by is not None)
        job.load_states({w[2] for w in work}, [r.name for r in absent])
        for rule, s, key in work:
            job.run_series(rule, s, key)
        for rule in absent:
            job.saw_data(rule, upto)

    def firing(self, session: Session, *, run: str) -> list[dict[str, Any]]:
        run_id = session.scalar(select(Run.id).where(Run.name == run))
        return [] if run_id is None else al.firing(session, run_id=run_id, run=run)

    # --- periodic: runs that stopped reporting ----------------------------------------

    def check_absent(self, now=None) -> int:
        """Fire absent rules whose data stopped; returns the number of alerts opened."""
        from logitwatch.service.absent import check_absent

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


class _Job:
    """One batch's evaluation: the loaded states and alerts, and their transitions."""

    def __init__(self, engine, session, run_row, batch, ctx, restarts) -> None:
        self.engine = engine
        self.session: Session = session
        self.run = run_row
        self.batch: Batch = batch
        self.ctx: RunContext = ctx
        self.restarts: _Restarts = restarts
        self.states: dict[tuple[str, str], RuleState] = {}
        self._silences = None
        self._triggers: dict[str, list[int]] = {}

    def load_states(self, keys: set[str], absent: list[str]) -> None:
        keys_l = sorted(keys) + (["*"] if absent else [])
        for i in range(0, len(keys_l), 500):
            rows = self.session.scalars(
                select(RuleState).where(
                    RuleState.run_id == self.run.id, RuleState.series_key.in_(keys_l[i : i + 500])
                )
            )
            for row in rows:
                self.states[(row.rule, row.series_key)] = row

    def _state(self, rule: str, key: str) -> RuleState:
        row = self.states.get((rule, key))
        if row is None:
            row = RuleState(
                run_id=self.run.id, rule=rule, series_key=key, segment=self.batch.segment,
                last_step=-1, state={}, updated_at=utcnow(),
            )  # fmt: skip
            self.session.add(row)
            self.states[(rule, key)] = row
        return row

    def triggers(self, rule: str) -> list[int]:
        """Every trigger step of ``rule`` on this run (this batch's included)."""
        if rule not in self._triggers:
            rows = self.session.scalars(
                select(RuleState).where(RuleState.run_id == self.run.id, RuleState.rule == rule)
            ).all()
            for row in rows:
                self.states.setdefault((row.rule, row.series_key), row)
            seen = {id(r): r for r in rows}
            seen.update({id(r): r for (n, _), r in self.states.items() if n == rule})
            self._triggers[rule] = sorted(t for r in seen.values() for t in r.state.get("trig", []))
        return self._triggers[rule]

    def run_series(self, rule: Rule, s: Series, key: str) -> None:
        row = self._state(rule.name, key)
        seg = self.batch.segment
        if seg < row.segment:
            return  # a late batch from before a resume
        st: dict[str, Any] = dict(row.state or {})
        last = row.last_step
        if seg > row.segment:
            # A resume opened a new segment: steps start over; keep the open alert.
            reset_windows(st)
            row.segment, last = seg, -1
        start = rule.min_step
        if rule.skip_warmup:
            start = max(start, self.ctx.warmup_steps)
        mute = rule.mute_after_restart
        # in step order; the store keeps a step's last value, so do we
        points = dict(zip(s.steps, s.values, strict=True))
        for step in sorted(points):
            if step <= last:
                continue
            if mute and self.restarts.crossed(last, step):
                reset_windows(st)
            prev, last = last, step
            if step < start:
                continue
            restart = self.restarts.last(step) if mute else None
            if restart is not None and step < restart + mute:
                continue
            verdict = evaluate(rule.condition, st, step, points[step], self.ctx)
            if verdict is not None:
                self._apply(rule, s, st, step, verdict, prev)
        row.last_step = last
        row.state = st  # a new dict, so the JSON column is written
        row.updated_at = utcnow()
        if rule.name in self._triggers:
            self._triggers.pop(rule.name)

    def _apply(self, rule: Rule, s: Series, st: dict, step: int, v: Verdict, prev: int) -> None:
        was_on = bool(st.get("on"))
        st["on"] = v.active
        if v.active and not was_on:
            st["trig"] = [*st.get("trig", []), step][-_MAX_TRIGGERS:]
            if rule.preceded_by is not None:
                p = rule.preceded_by
                st["blocked"] = not any(
                    step - p.within_steps <= t < step for t in self.triggers(p.rule)
                )
        active = v.active and not (rule.preceded_by is not None and st.get("blocked"))
        alert = self._alert(st.get("open"))
        if active:
            st["streak"] = st.get("streak", 0) + 1
            state = "firing" if st["streak"] >= rule.for_steps else "pending"
            if alert is None:
                alert = al.open_alert(
                    self.session, run_id=self.run.id, rule=rule.name, severity=rule.severity,
                    metric=s.metric, labels=s.labels, step=step, segment=self.batch.segment,
                    value=v.value, threshold=v.threshold, hint=rule.hint, state=state,
                )  # fmt: skip
                st["open"] = alert.id
                if state == "firing":
                    self._notify(alert, "firing")
                return
            alert.last_step, alert.value, alert.threshold = step, v.value, v.threshold
            alert.updated_at = utcnow()
            if alert.state == "pending" and state == "firing":
                alert.state, alert.fired_at = "firing", utcnow()
                self._notify(alert, "firing")
            return
        st["streak"] = 0
        st.pop("open", None)
        if alert is None:
            return
        if alert.state == "pending":
            self.session.delete(alert)  # it never fired: like Prometheus, forget it
        else:
            al.resolve_alert(alert, step=step)
            self._notify(alert, "resolved")
        self.session.flush()  # free the (run, rule, series) slot for the next episode

    def _alert(self, alert_id: int | None) -> Alert | None:
        if alert_id is None:
            return None
        alert = self.session.get(Alert, alert_id)
        return alert if alert is not None and alert.state != "resolved" else None

    def _notify(self, alert: Alert, event: str) -> None:
        if not self.engine.notifier.enabled:
            return
        if self._silences is None:
            self._silences = al.active_silences(self.session)
        if not al.is_silenced(self._silences, alert, self.run.name):
            self.engine.notifier.enqueue(self.session, alert=alert, run=self.run.name, event=event)

    def saw_data(self, rule: Rule, upto: int) -> None:
        """An absent rule's data arrived: remember when, and resolve its alert if open."""
        row = self._state(rule.name, "*")
        st = dict(row.state or {})
        alert = self._alert(st.pop("open", None))
        if alert is not None:
            al.resolve_alert(alert, step=upto)
            self._notify(alert, "resolved")
        row.last_step = max(row.last_step, upto)
        row.state = st
        row.updated_at = utcnow()
