"""POST /api/v1/runs/{run}/points: one batch (msgpack or JSON), stored in one transaction."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from logitwatch.protocol import check_run_name, decode_batch
from logitwatch.service.api.auth import require
from logitwatch.service.api.deps import (
    CompactorDep,
    EngineDep,
    MetricsDep,
    RulesDep,
    SettingsDep,
    WriterDep,
)
from logitwatch.service.api.errors import ApiError
from logitwatch.service.rules.alerts import with_links
from logitwatch.service.store import check_run_quota, ingest_batch, prepare_batch
from logitwatch.service.store.db import is_postgres

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/runs", tags=["points"])


async def raw_body(request: Request, settings: SettingsDep) -> bytes:
    """The request body, refused with 413 as soon as it passes settings.body_limit_bytes."""
    limit = settings.body_limit_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, "too_large", f"body of {declared} bytes exceeds body_limit_bytes={limit}"
        )
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, "too_large", f"body exceeds body_limit_bytes={limit}")
        parts.append(part)
    return b"".join(parts)


@router.post(
    "/{run}/points",
    dependencies=[Depends(require("ingest"))],
    summary="Store a batch of points",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/msgpack": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {"type": "object"}},
            },
            "required": True,
        }
    },
)
def post_points(
    run: str,
    request: Request,
    body: Annotated[bytes, Depends(raw_body)],
    settings: SettingsDep,
    engine: EngineDep,
    writer: WriterDep,
    rules: RulesDep,
    compactor: CompactorDep,
    metrics: MetricsDep,
) -> dict:
    """Columnar batch {client, seq, segment, series: [{metric, labels, steps, values, times}]}.

    A batch whose (client, seq) was stored before is acknowledged with duplicate=true and
    not stored again. The answer lists the run's firing alerts.
    """
    check_run_name(run)
    batch = decode_batch(body, request.headers.get("content-type"))
    prepared = prepare_batch(batch, postgres=is_postgres(engine))
    # Keep the write transaction short: decoding and packing happened above, while other
    # requests could write (SQLite has one writer; see store.db.Writer).
    with writer() as session:
        check_run_quota(session, run=run, max_runs=settings.max_runs)
        result = ingest_batch(
            session,
            run=run,
            batch=batch,
            max_series=settings.max_series_per_run,
            prepared=prepared,
        )
        if not result.duplicate:
            # The arrays the store just wrote, sorted and de-duplicated once for both.
            rules.on_batch(session, run=run, batch=batch, prepared=prepared)
        alerts = with_links(rules.firing(session, run=run), settings.dashboard_url)
        session.commit()
    if not result.duplicate:
        compactor.touch(result.series_ids, batch.segment)
    metrics.observe_batch(result.n_points, duplicate=result.duplicate)
    return {"accepted": result.n_points, "duplicate": result.duplicate, "alerts": alerts}
