"""Bearer-token auth for the API: ``require(scope)`` is the FastAPI dependency every router uses.

With ``settings.auth`` off (the default, loopback) everything is allowed. With it on, a request
without a valid token gets 401 and one whose token lacks the scope or the run gets 403. Scopes:
admin ⊇ read, ingest. A token with a run pattern (fnmatch) reaches only the runs it matches:
routes with a ``{run}`` path parameter (or a ``run`` query parameter) are checked here; list
routes filter their answer with :func:`run_filter`. Tokens are never logged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from logitwatch.service.api.deps import ReadsDep, SettingsDep
from logitwatch.service.api.errors import ApiError
from logitwatch.service.store.tokens import SCOPES, authenticate, run_allowed, scope_allows

__all__ = ["SCOPES", "Principal", "principal", "require", "run_filter"]

_BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: the token's id, name, scope and run pattern (never the secret)."""

    token_id: int
    name: str
    scope: str
    run_pattern: str | None

    def reaches(self, run: str) -> bool:
        return run_allowed(self.run_pattern, run)


def _unauthorized(detail: str) -> ApiError:
    return ApiError(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    if not header[: len(_BEARER)].lower() == _BEARER:
        raise _unauthorized("the Authorization header must be 'Bearer <token>'")
    return header[len(_BEARER) :].strip()


def _authenticate(request: Request, reads: sessionmaker[Session]) -> Principal:
    token = _presented(request)
    if not token:
        raise _unauthorized("this server needs a token: send 'Authorization: Bearer <token>'")
    with reads() as session:
        row = authenticate(session, token=token)
        if row is None:
            raise _unauthorized("the token is unknown or revoked")
        return Principal(row.id, row.name, row.scope, row.run_pattern)


def require(scope: str) -> Callable[[Request], Principal | None]:
    """A dependency that lets the request through if its token has ``scope`` (and its run)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")

    async def dependency(
        request: Request, settings: SettingsDep, reads: ReadsDep
    ) -> Principal | None:
        # async: with auth off (the default) this costs no thread hand-off; the token
        # lookup, a database read, runs on the thread pool.
        if not settings.auth:
            return None
        who = await run_in_threadpool(_authenticate, request, reads)
        if not scope_allows(who.scope, scope):
            raise ApiError(403, "forbidden", f"this needs a token with scope '{scope}'")
        run = request.path_params.get("run") or request.query_params.get("run")
        if run is not None and not who.reaches(run):
            raise ApiError(403, "forbidden", f"this token does not reach run '{run}'")
        request.state.principal = who
        return who

    dependency.scope = scope  # type: ignore[attr-defined]  # lets tests find each route's scope
    return dependency


def principal(request: Request) -> Principal | None:
    """The authenticated token of this request (None when auth is off)."""
    return getattr(request.state, "principal", None)


def run_filter(request: Request) -> Callable[[str], bool]:
    """For list routes: which runs this request may see."""
    who = principal(request)
    return (lambda run: True) if who is None else who.reaches
