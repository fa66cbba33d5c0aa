"""Runs and their data: PUT/GET a run, list runs, list a run's series, read a metric."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from logitwatch.protocol import (
    ProtocolError,
    check_label_key,
    check_metric_name,
    check_run_name,
    dump_float,
)
from logitwatch.service import store
from logitwatch.service.api.auth import require, run_filter
from logitwatch.service.api.deps import SessionDep, SettingsDep, WriterDep
from logitwatch.service.api.errors import ApiError
from logitwatch.service.api.render import render_read

__all__ = ["RunIn", "RunOut", "router"]

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])
_READ = [Depends(require("read"))]
#: Query parameters of the metric read that are not label filters.
_RESERVED = {"start", "end", "max_points", "segments", "limit", "cursor", "times"}


class RunIn(BaseModel):
    """Body of PUT /api/v1/runs/{run}; fields left out keep their stored value."""

    model_config = ConfigDict(extra="ignore")

    config: dict[str, Any] | None = None
    tags: dict[str, Any] | list[str] | None = None


class RunOut(BaseModel):
    name: str
    config: dict[str, Any]
    tags: Any
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    n_series: int
    max_segment: int = Field(description="highest segment stored, -1 before the first point")
    last_step: int | None = Field(description="highest step of max_segment")


def _out(info: store.RunInfo) -> RunOut:
    return RunOut.model_validate(info, from_attributes=True)


def _run_name(run: str) -> str:
    return check_run_name(run, "path.run")


def _unknown(run: str) -> ApiError:
    return ApiError(404, "not_found", f"run {run!r} does not exist")


@router.put(
    "/{run}", dependencies=[Depends(require("ingest"))], responses={201: {"description": "Created"}}
)
def put_run(
    run: str,
    response: Response,
    settings: SettingsDep,
    writer: WriterDep,
    body: RunIn | None = None,
) -> RunOut:
    """Create the run or update its config/tags (idempotent). 201 when created."""
    _run_name(run)
    body = body or RunIn()
    with writer() as session:
        store.check_run_quota(session, run=run, max_runs=settings.max_runs)
        created = store.upsert_run(session, name=run, config=body.config, tags=body.tags)
        session.commit()
        info = store.get_run(session, name=run)
    response.status_code = 201 if created else 200
    return _out(info)


@router.get("", dependencies=_READ)
def list_runs(request: Request, session: SessionDep) -> dict[str, list[RunOut]]:
    visible = run_filter(request)  # a run-scoped token sees only its runs
    return {"runs": [_out(r) for r in store.list_runs(session) if visible(r.name)]}


@router.get("/{run}", dependencies=_READ)
def get_run(run: str, session: SessionDep) -> RunOut:
    info = store.get_run(session, name=_run_name(run))
    if info is None:
        raise _unknown(run)
    return _out(info)


@router.get("/{run}/series", dependencies=_READ)
def list_series(run: str, session: SessionDep, metric: str | None = None) -> dict:
    """Each series with its labels, point count, first/last step and last value."""
    series = store.list_series(session, run=_run_name(run), metric=metric)
    if series is None:
        raise _unknown(run)
    return {
        "run": run,
        "series": [
            {
                "metric": s.metric,
                "labels": s.labels,
                "n_points": s.n_points,
                "first_step": s.first_step,
                "last_step": s.last_step,
                "last_segment": s.last_segment,
                "last_value": None if s.last_value is None else dump_float(s.last_value),
                "last_time": s.last_time,
            }
            for s in series
        ],
    }


@router.get("/{run}/metrics/{metric}", dependencies=_READ)
def read_metric(
    run: str,
    metric: str,
    request: Request,
    session: SessionDep,
    start: Annotated[int | None, Query(ge=0, description="first step (inclusive)")] = None,
    end: Annotated[int | None, Query(ge=0, description="last step (inclusive)")] = None,
    max_points: Annotated[
        int | None, Query(ge=1, le=100_000, description="bucket the range into at most this many")
    ] = None,
    segments: Annotated[Literal["newest", "all"], Query()] = "newest",
    limit: Annotated[int | None, Query(ge=1, le=5_000_000, description="page size")] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    times: Annotated[bool, Query(description="include wall-clock times")] = True,
    layer: str | None = None,
    head: str | None = None,
) -> Response:
    """Points of one metric; any other query parameter (layer=0, head=3, ...) filters labels.

    Without max_points every point comes back, newest segment per step, in pages of
    `limit` (default 100,000): pass next_cursor back as cursor. With max_points the step
    range is cut into buckets, each with first/last step, count, min, max, first, last
    value and nan (NaN count; min/max skip NaN). JSON spells non-finite values 'NaN',
    'Infinity', '-Infinity'; send Accept: application/msgpack for packed arrays.
    """
    _run_name(run)
    check_metric_name(metric, "path.metric")
    labels = {}
    for key, value in request.query_params.items():
        if key not in _RESERVED:
            labels[check_label_key(key, f"query.{key}")] = value
    try:
        result = store.read_points(
            session,
            run=run,
            metric=metric,
            labels=labels,
            start=start,
            end=end,
            max_points=max_points,
            segments_all=segments == "all",
            limit=limit,
            cursor=cursor,
            times=times,
        )
    except ValueError as exc:
        raise ProtocolError("query.cursor", str(exc)) from None
    if result is None:
        raise _unknown(run)
    head_ = {"run": run, "metric": metric, "max_points": max_points, "segments": segments}
    return render_read(request, head_, result)
