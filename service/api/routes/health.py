"""Liveness (/healthz: the process is up) and readiness (/readyz: the database answers)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from logitwatch.service.api.deps import EngineDep
from logitwatch.service.api.errors import ApiError

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(engine: EngineDep) -> dict:
    try:
        with engine.connect() as conn:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception as exc:
        raise ApiError(
            503,
            "unavailable",
            f"database not ready ({type(exc).__name__}); is it up and migrated "
            "(logitwatch db upgrade)?",
            headers={"Retry-After": "1"},
        ) from None
    return {"status": "ready", "schema": version}
