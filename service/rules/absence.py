"""The periodic check behind ``absent`` rules: a run whose selected metrics stopped arriving.

Every batch records, in the run's own rule_state row, when each absent rule last saw a
matching metric; this check fires when that is older than the rule's ``seconds``. Runs that
reached their configured number of steps, or are silent for longer than the horizon, count as
finished: no alert, or their alert resolves.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.service.rules import alerts as al
from logitwatch.service.rules.conditions import RunContext
from logitwatch.service.rules.state import RUN_KEY
from logitwatch.service.store.db import WRITE
from logitwatch.service.store.models import Run
from logitwatch.service.store.rule_tables import Alert, RuleState
from logitwatch.service.store.sql import is_pg

__all__ = ["check_absent"]

_T = RuleState.__table__


def check_absent(engine, sm: sessionmaker[Session], *, now: datetime) -> int:
    """Open (or resolve) absent alerts; returns the number opened."""
    opened = 0
    with sm() as session, session.begin():
        session.connection(execution_options={WRITE: True})
        rules = [r for r in engine.rules(session) if r.condition.kind == "absent"]
        if not rules:
            return 0
        q = (
            select(_T.c.run_id, _T.c.state, Run.name, Run.config)
            .join(Run, Run.id == _T.c.run_id)
            .where(_T.c.series_key == RUN_KEY)
        )
        if is_pg(session):
            # Another process checking (or a batch arriving) holds the row: skip it this time.
            q = q.with_for_update(of=_T, skip_locked=True)
        silences = None
        for run_id, state, run, config in session.execute(q).all():
            state = dict(state or {})
            # A run that reached the number of steps its config declares has finished, not
            # stopped: it is never "silent" (the trainer records config.train.steps).
            # A run reporting every N steps sends its last report up to N - 1 steps before.
            ctx = RunContext.from_config(config)
            total = ctx.config_value("steps")
            every = max(int(ctx.config_value("every") or 1), 1)
            seen, open_ = state.get("seen", {}), state.setdefault("absent_open", {})
            changed = False
            for rule in rules:
                if rule.name not in seen:
                    continue
                t, last_step = seen[rule.name]
                silent = now.timestamp() - t
                alert = session.get(Alert, open_[rule.name]) if rule.name in open_ else None
                if alert is not None and alert.state == "resolved":
                    alert = None
                done = total is not None and last_step + every >= total
                if done or silent > engine.absent_horizon_s or silent < rule.condition.seconds:
                    if alert is not None and (done or silent > engine.absent_horizon_s):
                        al.resolve_alert(alert, step=last_step)
                        open_.pop(rule.name)
                        changed = True
                    continue
                if alert is not None:
                    alert.value = silent
                    continue
                alert = al.open_alert(
                    session, run_id=run_id, rule=rule.name, severity=rule.severity,
                    metric=",".join(rule.metrics), labels={}, step=max(last_step, 0), segment=0,
                    value=silent, threshold=rule.condition.seconds, hint=rule.hint,
                    state="firing",
                )  # fmt: skip
                open_[rule.name] = alert.id
                changed = True
                opened += 1
                if engine.notifier.enabled:
                    silences = silences if silences is not None else al.active_silences(session)
                    if not al.is_silenced(silences, alert, run):
                        engine.notifier.enqueue(session, alert=alert, run=run, event="firing")
            if changed:
                session.execute(
                    update(_T)
                    .where(_T.c.run_id == run_id, _T.c.series_key == RUN_KEY)
                    .values(state=state)
                )
    return opened
