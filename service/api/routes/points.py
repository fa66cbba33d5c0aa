"""POST /api/v1/runs/{run}/points: one batch (msgpack or JSON), stored exactly once.

The endpoint decodes and packs the batch, then waits for the group commit (api/ingest.py)
that stores it with other requests' batches in one transaction.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from logitwatch.protocol import Batch, check_run_name, decode_batch
from logitwatch.service.api.auth import require
from logitwatch.service.api.deps import IngestDep, MetricsDep, SettingsDep
from logitwatch.service.api.errors import ApiError
from logitwatch.service.store import Prepared, prepare_batch

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
async def post_points(
    run: str,
    request: Request,
    body: Annotated[bytes, Depends(raw_body)],
    settings: SettingsDep,
    ingest: IngestDep,
    metrics: MetricsDep,
) -> dict:
    """Columnar batch {client, seq, segment, series: [{metric, labels, steps, values, times}]}.

    A batch whose (client, seq) was stored before is acknowledged with duplicate=true and
    not stored again. The answer lists the run's firing alerts.
    """
    check_run_name(run)
    content_type = request.headers.get("content-type")
    # Decoding and packing need no lock: small bodies here, big ones off the event loop.
    if len(body) <= _INLINE_BYTES:
        batch, prepared = _decode(body, content_type, ingest.postgres)
    else:
        batch, prepared = await run_in_threadpool(_decode, body, content_type, ingest.postgres)
    answer = await ingest.store(settings, run, batch, prepared)
    metrics.observe_batch(answer["accepted"], duplicate=answer["duplicate"])
    return answer


#: Bodies up to this size are decoded on the event loop (a 200-point request: ~5 KiB).
_INLINE_BYTES = 64 * 1024


def _decode(body: bytes, content_type: str | None, postgres: bool) -> tuple[Batch, Prepared]:
    batch = decode_batch(body, content_type)
    return batch, prepare_batch(batch, postgres=postgres)
