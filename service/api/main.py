"""The API's routers, gathered: one per resource under ``/api/v1``, plus health."""

from __future__ import annotations

from fastapi import APIRouter

from logitwatch.service.api.routes import alerts, health, points, rules, runs

__all__ = ["api_router"]

api_router = APIRouter()
for _module in (health, runs, points, alerts, rules):
    api_router.include_router(_module.router)
