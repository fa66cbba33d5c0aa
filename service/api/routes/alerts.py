"""Alerts and silences: GET /api/v1/alerts, POST /api/v1/alerts/{id}/ack, /api/v1/silences CRUD."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from logitwatch.service.api.auth import require, run_filter
from logitwatch.service.api.deps import SessionDep, SettingsDep, WriterDep
from logitwatch.service.api.errors import ApiError
from logitwatch.service.rules import alerts as al
from logitwatch.service.store.models import utcnow
from logitwatch.service.store.rule_tables import Silence

__all__ = ["router"]

#: A row id: beyond int64 the database itself errs (500s before this bound).
RowId = Annotated[int, Path(ge=1, le=2**63 - 1)]

router = APIRouter(prefix="/api/v1", tags=["alerts"])


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid", [{"field": field, "message": message}])


@router.get("/alerts", dependencies=[Depends(require("read"))], summary="List alerts")
def list_alerts(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    run: str | None = None,
    state: str | None = None,
    severity: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> dict:
    """Newest first, filtered by run, state (pending|firing|resolved) and severity."""
    if state is not None and state not in al.ALERT_STATES:
        raise _invalid("state", f"must be one of {', '.join(al.ALERT_STATES)}")
    if severity is not None and severity not in al.SEVERITIES:
        raise _invalid("severity", f"must be one of {', '.join(al.SEVERITIES)}")
    rows = al.list_alerts(session, run=run, state=state, severity=severity, limit=limit)
    visible = run_filter(request)  # a run-scoped token sees its runs' alerts only
    return {"alerts": al.with_links([a for a in rows if visible(a["run"])], settings.dashboard_url)}


@router.get("/alerts/{alert_id}", dependencies=[Depends(require("read"))], summary="One alert")
def get_alert(
    alert_id: RowId, request: Request, session: SessionDep, settings: SettingsDep
) -> dict:
    visible = run_filter(request)
    for a in al.list_alerts(session, alert_id=alert_id):
        if visible(a["run"]):
            return al.with_links([a], settings.dashboard_url)[0]
    raise ApiError(404, "not_found", f"no alert {alert_id}")


class AckBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: str | None = Field(default=None, max_length=128)


@router.post(
    "/alerts/{alert_id}/ack", dependencies=[Depends(require("read"))], summary="Acknowledge"
)
def ack(alert_id: RowId, request: Request, writer: WriterDep, body: AckBody | None = None) -> dict:
    """Mark an alert as seen; it keeps its state (and resolves on its own)."""
    visible = run_filter(request)
    with writer() as session:
        found = al.list_alerts(session, alert_id=alert_id)
        if not found or not visible(found[0]["run"]):
            raise ApiError(404, "not_found", f"no alert {alert_id}")
        out = al.ack_alert(session, alert_id=alert_id, by=body.by if body else None)
        if out is None:
            raise ApiError(404, "not_found", f"no alert {alert_id}")
        session.commit()
    return out


class SilenceBody(BaseModel):
    """Match by run, rule and/or labels (all given must match), until a time or for a while."""

    model_config = ConfigDict(extra="forbid")
    run: str | None = Field(default=None, max_length=128)
    rule: str | None = Field(default=None, max_length=64)
    labels: dict[str, str] = Field(default_factory=dict)
    until: datetime | None = None
    duration_s: float | None = Field(default=None, gt=0, le=100 * 365 * 86400)  # < a century
    comment: str = Field(default="", max_length=1000)
    created_by: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _check(self) -> SilenceBody:
        if self.run is None and self.rule is None and not self.labels:
            raise ValueError("a silence needs a run, a rule or labels to match")
        if (self.until is None) == (self.duration_s is None):
            raise ValueError("give exactly one of until (a time) or duration_s")
        if self.until is not None and self.until.tzinfo is None:
            raise ValueError("until needs a time zone, e.g. 2026-01-01T12:00:00Z")
        return self


@router.get("/silences", dependencies=[Depends(require("read"))], summary="List silences")
def list_silences(session: SessionDep, active: bool = False) -> dict:
    return {"silences": [al.silence_dict(s) for s in al.list_silences(session, active_only=active)]}


@router.post(
    "/silences",
    dependencies=[Depends(require("admin"))],
    status_code=201,
    summary="Create a silence",
)
def create_silence(body: SilenceBody, writer: WriterDep) -> dict:
    until = body.until or utcnow() + timedelta(seconds=body.duration_s or 0)
    with writer() as session:
        s = al.create_silence(
            session,
            until=until,
            run=body.run,
            rule=body.rule,
            labels=body.labels,
            comment=body.comment,
            created_by=body.created_by,
        )
        out = al.silence_dict(s)
        session.commit()
    return out


@router.get("/silences/{silence_id}", dependencies=[Depends(require("read"))])
def get_silence(silence_id: RowId, session: SessionDep) -> dict:
    s = session.get(Silence, silence_id)
    if s is not None:
        return al.silence_dict(s)
    raise ApiError(404, "not_found", f"no silence {silence_id}")


@router.delete("/silences/{silence_id}", dependencies=[Depends(require("admin"))])
def delete_silence(silence_id: RowId, writer: WriterDep) -> dict:
    with writer() as session:
        if not al.delete_silence(session, silence_id=silence_id):
            raise ApiError(404, "not_found", f"no silence {silence_id}")
        session.commit()
    return {"deleted": silence_id}
