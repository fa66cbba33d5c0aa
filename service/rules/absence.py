"""The periodic check behind ``absent`` rules: a run whose selected metrics stopped arriving.

Every batch records, in the run's own rule_state row, when each absent rule last saw a
matching metric; this check fires when that is older than the rule's ``seconds``. Runs that
reached their configured number of steps, or are silent for longer than the horizon, count as
finished: no alert, or their alert resolves.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

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


def check_absent(
    engine,
    sm: sessionmaker[Session],
    *,
    now: datetime,
    lock: contextlib.AbstractContextManager | None = None,
) -> int:
    """Open (or resolve) absent alerts; returns the number opened.

    First a read finds the runs it may change (an absent alert open, or a rule's metrics
    silent for its seconds): usually none. Only those are then read again and changed in a
    write transaction, under ``lock`` (this process's writer lock): a write transaction over
    every run held the SQLite writer for ~40 ms every check under a fleet's load, and the
    ingest group commit queued behind it, measured."""
    with sm() as session:
        session.connection(execution_options={WRITE: False})
        rules = [r for r in engine.rules(session) if r.condition.kind == "absent"]
        if not rules:
            return 0
        q = select(_T.c.run_id, _T.c.state, Run.config).join(Run, Run.id == _T.c.run_id)
        q = q.where(_T.c.series_key == RUN_KEY)
        due = [
            run_id
            for run_id, state, config in session.execute(q)
            if _may_change(engine, rules, state or {}, config, now)
        ]
    opened = 0
    for i in range(0, len(due), 500):
        with lock or contextlib.nullcontext():
            opened += _check(engine, sm, due[i : i + 500], now)
    return opened


def _finished(ctx: RunContext, last_step: int) -> bool:
    """A run that reached the number of steps its config declares has finished, not
    stopped: it is never "silent" (the trainer records config.train.steps). A run reporting
    every N steps sends its last report up to N - 1 steps before."""
    total = ctx.config_value("steps")
    every = max(int(ctx.config_value("every") or 1), 1)
    return total is not None and last_step + every >= total


def _may_change(engine, rules: list, state: dict, config: Any, now: datetime) -> bool:
    """Whether _check may change this run: an absent alert of it is open, or a rule's
    metrics are silent past its seconds (the run neither finished nor past the horizon)."""
    seen, open_ = state.get("seen", {}), state.get("absent_open", {})
    ctx = None
    for rule in rules:
        if rule.name in open_:
            return True
        if rule.name not in seen:
            continue
        t, last_step = seen[rule.name]
        silent = now.timestamp() - t
        if rule.condition.seconds <= silent <= engine.absent_horizon_s:
            ctx = ctx or engine.context(config)
            if not _finished(ctx, last_step):
                return True
    return False


def _check(engine, sm: sessionmaker[Session], run_ids: list[int], now: datetime) -> int:
    """Open, update or resolve the absent alerts of ``run_ids``, read afresh in a write
    transaction; returns the number opened."""
    opened = 0
    with sm() as session, session.begin():
        session.connection(execution_options={WRITE: True})
        rules = [r for r in engine.rules(session) if r.condition.kind == "absent"]
        if not rules:
            return 0
        q = (
            select(_T.c.run_id, _T.c.state, Run.name, Run.config)
            .join(Run, Run.id == _T.c.run_id)
            .where(_T.c.series_key == RUN_KEY, _T.c.run_id.in_(run_ids))
        )
        if is_pg(session):
            # Another process checking (or a batch arriving) holds the row: skip it this time.
            q = q.with_for_update(of=_T, skip_locked=True)
        silences = None
        for run_id, state, run, config in session.execute(q).all():
            state = dict(state or {})
            ctx = engine.context(config)
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
                done = _finished(ctx, last_step)
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
