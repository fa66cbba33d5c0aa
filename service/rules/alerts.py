"""Alert lifecycle (pending -> firing -> resolved), acknowledgement and silences, as data access.

Keyword-only functions taking a Session; ``alert_dict`` is the one JSON shape of an alert
(the ingest answer, GET /api/v1/alerts, webhook payloads).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from urllib.parse import quote

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from logitwatch.protocol import dump_float
from logitwatch.service.store.models import Run, utcnow
from logitwatch.service.store.rule_tables import Alert, Silence
from logitwatch.service.store.sql import labels_key

__all__ = [
    "ALERT_STATES",
    "SEVERITIES",
    "ack_alert",
    "active_silences",
    "alert_dict",
    "create_silence",
    "dashboard_link",
    "delete_silence",
    "firing",
    "firing_counts",
    "is_silenced",
    "list_alerts",
    "list_silences",
    "open_alert",
    "resolve_alert",
    "silence_dict",
    "with_links",
]

ALERT_STATES = ("pending", "firing", "resolved")
SEVERITIES = ("info", "warning", "critical")


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _num(x: float | None) -> float | str | None:
    return None if x is None else dump_float(x)


def dashboard_link(
    base: str | None, run: str, step: int | None, *, margin: int = 200
) -> str | None:
    """The run deep-dive dashboard zoomed on the alert's step (None without a dashboard URL).

    >>> dashboard_link("http://grafana:3000/", "r 1", 500)
    'http://grafana:3000/d/logitwatch-run/run-deep-dive?var-run=r%201&var-step_min=300&var-step_max=700'
    """
    if not base:
        return None
    step = step or 0
    return (
        f"{base.rstrip('/')}/d/logitwatch-run/run-deep-dive?var-run={quote(run, safe='')}"
        f"&var-step_min={max(step - margin, 0)}&var-step_max={step + margin}"
    )


def with_links(alerts: list[dict[str, Any]], base: str | None) -> list[dict[str, Any]]:
    """Each alert with ``dashboard``: the link to its run's dashboard at the step it fired
    (its first step while pending, or when stored before the service recorded it)."""
    for a in alerts:
        step = a.get("fired_step")
        a["dashboard"] = dashboard_link(
            base, a["run"], a.get("first_step") if step is None else step
        )
    return alerts


def alert_dict(alert: Alert, run: str, *, silenced: bool = False) -> dict[str, Any]:
    """JSON-safe: non-finite values are spelled 'NaN', 'Infinity', '-Infinity'."""
    return {
        "id": alert.id,
        "run": run,
        "rule": alert.rule,
        "severity": alert.severity,
        "state": alert.state,
        "metric": alert.metric,
        "labels": dict(alert.labels or {}),
        "first_step": alert.first_step,
        "last_step": alert.last_step,
        "segment": alert.segment,
        # SQLite stores NaN as NULL; a stored alert always has a value.
        "value": _num(math.nan if alert.value is None else alert.value),
        "threshold": _num(alert.threshold),
        "hint": alert.hint,
        "acked": alert.acked_at is not None,
        "acked_by": alert.acked_by,
        "silenced": silenced,
        "created_at": _iso(alert.created_at),
        "fired_at": _iso(alert.fired_at),
        "fired_step": alert.fired_step,
        "resolved_at": _iso(alert.resolved_at),
        "resolved_step": alert.resolved_step,
    }


def open_alert(
    session: Session,
    *,
    run_id: int,
    rule: str,
    severity: str,
    metric: str,
    labels: dict[str, str],
    step: int,
    segment: int,
    value: float,
    threshold: float | None,
    hint: str,
    state: str,
) -> Alert:
    now = utcnow()
    alert = Alert(
        run_id=run_id,
        rule=rule,
        severity=severity,
        metric=metric,
        labels=dict(labels),
        labels_key=labels_key(labels),
        state=state,
        segment=segment,
        first_step=step,
        last_step=step,
        value=value,
        threshold=threshold,
        hint=hint,
        created_at=now,
        updated_at=now,
        fired_at=now if state == "firing" else None,
        fired_step=step if state == "firing" else None,
    )
    session.add(alert)
    session.flush()  # the id goes into the rule state
    return alert


def resolve_alert(alert: Alert, *, step: int | None) -> None:
    now = utcnow()
    alert.state = "resolved"
    alert.resolved_at = now
    alert.resolved_step = step
    alert.updated_at = now
    if alert.am_due_at is not None:  # Alertmanager has it (or is about to): say it ended
        alert.am_due_at = now


def _query(
    run: str | None, state: str | None, severity: str | None, alert_id: int | None
) -> Select:
    q = select(Alert, Run.name).join(Run, Run.id == Alert.run_id)
    if alert_id is not None:
        q = q.where(Alert.id == alert_id)
    if run is not None:
        q = q.where(Run.name == run)
    if state is not None:
        q = q.where(Alert.state == state)
    if severity is not None:
        q = q.where(Alert.severity == severity)
    return q


def list_alerts(
    session: Session,
    *,
    run: str | None = None,
    state: str | None = None,
    severity: str | None = None,
    alert_id: int | None = None,
    limit: int = 500,
) -> list[dict[str, Any]]:
    """Newest first; each dict says whether an active silence covers it."""
    rows = session.execute(
        _query(run, state, severity, alert_id).order_by(Alert.id.desc()).limit(limit)
    ).all()
    silences = active_silences(session)
    return [alert_dict(a, name, silenced=is_silenced(silences, a, name)) for a, name in rows]


def firing(session: Session, *, run_id: int, run: str) -> list[dict[str, Any]]:
    """The run's firing alerts that no silence covers (what the training process acts on)."""
    alerts = session.scalars(
        select(Alert).where(Alert.run_id == run_id, Alert.state == "firing").order_by(Alert.id)
    ).all()
    if not alerts:
        return []
    silences = active_silences(session)
    return [alert_dict(a, run) for a in alerts if not is_silenced(silences, a, run)]


def firing_counts(session: Session) -> dict[tuple[str, str, str], int]:
    """(run, rule, severity) -> number of firing alerts, for logitwatch_alerts_firing.

    Silenced alerts count: a silence mutes notifications, not the state.
    """
    rows = session.execute(
        select(Run.name, Alert.rule, Alert.severity, func.count())
        .join(Run, Run.id == Alert.run_id)
        .where(Alert.state == "firing")
        .group_by(Run.name, Alert.rule, Alert.severity)
    ).all()
    return {(run, rule, sev): n for run, rule, sev, n in rows}


def ack_alert(session: Session, *, alert_id: int, by: str | None = None) -> dict | None:
    row = session.execute(
        select(Alert, Run.name).join(Run, Run.id == Alert.run_id).where(Alert.id == alert_id)
    ).first()
    if row is None:
        return None
    alert, run = row
    if alert.acked_at is None:
        alert.acked_at = utcnow()
        alert.acked_by = by
    return alert_dict(alert, run)


# --- silences -------------------------------------------------------------------------


def active_silences(session: Session, now: datetime | None = None) -> list[Silence]:
    now = now or utcnow()
    return list(session.scalars(select(Silence).where(Silence.until > now)).all())


def _matches(s: Silence, alert: Alert, run: str) -> bool:
    if s.run is not None and s.run != run:
        return False
    if s.rule is not None and s.rule != alert.rule:
        return False
    labels = alert.labels or {}
    return all(labels.get(k) == v for k, v in (s.labels or {}).items())


def is_silenced(silences: Iterable[Silence], alert: Alert, run: str) -> bool:
    return any(_matches(s, alert, run) for s in silences)


def silence_dict(s: Silence) -> dict[str, Any]:
    return {
        "id": s.id,
        "run": s.run,
        "rule": s.rule,
        "labels": dict(s.labels or {}),
        "until": _iso(s.until),
        "active": s.until is not None and s.until > utcnow(),
        "comment": s.comment,
        "created_by": s.created_by,
        "created_at": _iso(s.created_at),
    }


def create_silence(
    session: Session,
    *,
    until: datetime,
    run: str | None = None,
    rule: str | None = None,
    labels: dict[str, str] | None = None,
    comment: str = "",
    created_by: str | None = None,
) -> Silence:
    if run is None and rule is None and not labels:
        raise ValueError("a silence needs a run, a rule or labels to match")
    s = Silence(
        run=run,
        rule=rule,
        labels=dict(labels or {}),
        until=until,
        comment=comment,
        created_by=created_by,
    )
    session.add(s)
    session.flush()
    return s


def list_silences(session: Session, *, active_only: bool = False) -> list[Silence]:
    q = select(Silence).order_by(Silence.id)
    if active_only:
        q = q.where(Silence.until > utcnow())
    return list(session.scalars(q).all())


def delete_silence(session: Session, *, silence_id: int) -> bool:
    s = session.get(Silence, silence_id)
    if s is None:
        return False
    session.delete(s)
    return True
