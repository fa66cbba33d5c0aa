"""The periodic check behind ``absent`` rules: a run whose selected metrics stopped arriving.

Each absent rule keeps one rule_state row per run (series key ``*``), touched by every batch
that carries a matching metric; this check fires when the row is older than the rule's
``seconds``. Runs silent for longer than the horizon count as finished: their alert resolves.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.service import alerts as al
from logitwatch.service.db import WRITE
from logitwatch.service.models import Run
from logitwatch.service.models_rules import Alert, RuleState
from logitwatch.service.store_sql import is_pg

__all__ = ["check_absent"]


def check_absent(engine, sm: sessionmaker[Session], *, now: datetime) -> int:
    opened = 0
    with sm() as session, session.begin():
        session.connection(execution_options={WRITE: True})
        rules = [r for r in engine.rules(session) if r.condition.kind == "absent"]
        horizon = now - timedelta(seconds=engine.absent_horizon_s)
        for rule in rules:
            cutoff = now - timedelta(seconds=rule.condition.seconds)
            q = (
                select(RuleState, Run.name)
                .join(Run, Run.id == RuleState.run_id)
                .where(
                    RuleState.rule == rule.name,
                    RuleState.series_key == "*",
                    RuleState.updated_at < cutoff,
                )
            )
            if is_pg(session):
                # Two processes checking at once: the second waits, then sees the alert.
                q = q.with_for_update(of=RuleState)
            for row, run in session.execute(q).all():
                opened += _check_row(engine, session, rule, row, run, now, horizon)
    return opened


def _check_row(engine, session: Session, rule, row: RuleState, run: str, now, horizon) -> int:
    st = dict(row.state or {})
    alert = session.get(Alert, st["open"]) if st.get("open") else None
    updated = al.as_utc(row.updated_at)
    silent_s = (now - updated).total_seconds()
    if updated < horizon:
        if alert is not None and alert.state != "resolved":
            al.resolve_alert(alert, step=row.last_step)
            st.pop("open", None)
            row.state = st  # updated_at stays: it says when the data stopped
        return 0
    if alert is not None and alert.state != "resolved":
        alert.value = silent_s
        return 0
    alert = al.open_alert(
        session,
        run_id=row.run_id,
        rule=rule.name,
        severity=rule.severity,
        metric=",".join(rule.metrics),
        labels={},
        step=max(row.last_step, 0),
        segment=row.segment,
        value=silent_s,
        threshold=rule.condition.seconds,
        hint=rule.hint,
        state="firing",
    )
    st["open"] = alert.id
    row.state = st
    if engine.notifier.enabled and not al.is_silenced(al.active_silences(session), alert, run):
        engine.notifier.enqueue(session, alert=alert, run=run, event="firing")
    return 1
