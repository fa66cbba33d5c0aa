"""The API's routers, gathered: one per resource under ``/api/v1``, plus health."""

from __future__ import annotations

from fastapi import APIRouter

from logitwatch.service.api.routes import alerts, health, points, rules, runs

__all__ = ["api_router"]

api_router = APIRouter()
# POST points first: it is nearly every request a fleet sends, and a request is matched
# against the routes in order (no other route's path matches its own).
for _module in (points, health, runs, alerts, rules):
    api_router.include_router(_module.router)
