"""POST /api/v1/runs/{run}/points: one batch (msgpack or JSON), stored in one transaction."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from logitwatch.protocol import check_run_name, decode_batch

from . import store
from .alerts import with_links
from .auth import require
from .db import is_postgres
from .errors import ApiError
from .limits import check_run_quota

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/runs", tags=["points"])


async def raw_body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it passes settings.body_limit_bytes."""
    limit = request.app.state.settings.body_limit_bytes
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
def post_points(run: str, request: Request, body: Annotated[bytes, Depends(raw_body)]) -> dict:
    """Columnar batch {client, seq, segment, series: [{metric, labels, steps, values, times}]}.

    A batch whose (client, seq) was stored before is acknowledged with duplicate=true and
    not stored again. The answer lists the run's firing alerts.
    """
    check_run_name(run)
    batch = decode_batch(body, request.headers.get("content-type"))
    state = request.app.state
    prepared = store.prepare_batch(batch, postgres=is_postgres(state.engine))
    # SQLite has one writer: queue this process's writers on a lock rather than on the
    # database's busy handler, and keep the transaction short (decoding and packing
    # happened above, while other requests could write).
    with state.write_lock, state.write_sessionmaker() as session:
        check_run_quota(session, run=run, max_runs=state.settings.max_runs)
        result = store.ingest_batch(
            session,
            run=run,
            batch=batch,
            max_series=state.settings.max_series_per_run,
            prepared=prepared,
        )
        if not result.duplicate:
            state.rules.on_batch(session, run=run, batch=batch)
        alerts = with_links(state.rules.firing(session, run=run), state.settings.dashboard_url)
        session.commit()
    if not result.duplicate:
        state.compactor.touch(result.series_ids, batch.segment)
    state.prom.observe_batch(result.n_points, duplicate=result.duplicate)
    return {"accepted": result.n_points, "duplicate": result.duplicate, "alerts": alerts}
