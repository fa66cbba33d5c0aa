"""Prometheus exposition: `install(app, settings)` mounts GET /metrics (minimal version)."""

from __future__ import annotations

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .settings import Settings

__all__ = ["install"]


def install(app: FastAPI, settings: Settings) -> None:
    registry = CollectorRegistry()
    app.state.registry = registry

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
