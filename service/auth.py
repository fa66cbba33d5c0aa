"""API tokens: `require(scope)` is the FastAPI dependency every /api router uses.

Minimal version: with settings.auth off (the default on loopback) everything is allowed.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from .errors import ApiError

__all__ = ["SCOPES", "require"]

SCOPES = ("ingest", "read", "admin")


def require(scope: str) -> Callable[[Request], None]:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")

    def _check(request: Request) -> None:
        if request.app.state.settings.auth:
            raise ApiError(401, "unauthorized", "token authentication is not implemented yet")

    return _check
