"""JSON errors {"error": code, "detail": ...} with the right status for every failure."""

from __future__ import annotations

import psycopg
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from logitwatch.protocol import ProtocolError
from logitwatch.service.store import LimitError
from logitwatch.service.store.db import is_conflict

__all__ = ["ApiError", "BodyLimit", "install_error_handlers"]

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(HTTPException):
    """An HTTP error with a short code: ``raise ApiError(404, "not_found", "run 'x' ...")``."""

    def __init__(self, status: int, code: str, detail, headers: dict | None = None) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.code = code


def _body(status: int, code: str | None, detail) -> dict:
    return {"error": code or _CODES.get(status, "error"), "detail": detail}


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": {}},
}
#: Answers any operation may give (auth, limits, a database that is away), documented in
#: the OpenAPI schema so that clients (and schemathesis) know them.
_DOCUMENTED = (400, 401, 403, 404, 413, 415, 422, 429, 503)


def _document_errors(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    responses = op.setdefault("responses", {})
                    for status in _DOCUMENTED:
                        # 422 too: ours is {"error", "detail": [{field, message}]}, not FastAPI's.
                        responses[str(status)] = {
                            "description": _CODES[status].replace("_", " "),
                            "content": {"application/json": {"schema": _ERROR_SCHEMA}},
                        }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    _document_errors(app)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            _body(exc.status_code, getattr(exc, "code", None), exc.detail),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        return JSONResponse(_body(422, "invalid", detail), status_code=422)

    @app.exception_handler(ProtocolError)
    async def _protocol(_req: Request, exc: ProtocolError) -> JSONResponse:
        # Bytes that are not msgpack/JSON at all are 400; a well-formed batch with a bad
        # field is 422 and names the field.
        status = 400 if exc.field in ("body", "content-type") else 422
        detail = [{"field": exc.field, "message": exc.message}]
        return JSONResponse(_body(status, None, detail), status_code=status)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def _database(_req: Request, exc: Exception) -> JSONResponse:
        # The database is down, restarting or locked: a client should come back, not give up.
        # Other database errors (a bug, a constraint) stay 500s.
        transient = (PoolTimeout, OperationalError, InterfaceError)
        if not (isinstance(exc, transient) or getattr(exc, "connection_invalidated", False)):
            raise exc
        detail = f"database unavailable ({type(exc).__name__}); retry shortly"
        return JSONResponse(
            _body(503, "unavailable", detail), status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(psycopg.OperationalError)  # from statements sent past SQLAlchemy
    async def _db_down(_req: Request, exc: Exception) -> JSONResponse:
        # The database is unreachable or (SQLite) locked past busy_timeout: a client should
        # retry, and the agent's sender does (its spool keeps the batch meanwhile).
        reason = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
        if is_conflict(exc):  # aborted for another writer's sake: nothing of it was stored
            detail = f"write conflict ({reason}): nothing was stored; retry"
        else:
            detail = f"database unavailable: {reason}"
        return JSONResponse(
            _body(503, "unavailable", detail), status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(LimitError)
    async def _limit(_req: Request, exc: LimitError) -> JSONResponse:
        detail = [{"field": exc.field, "message": exc.message}]
        return JSONResponse(_body(422, "limit", detail), status_code=422)


class BodyLimit:
    """ASGI middleware: a declared Content-Length over `limit` is refused with 413 up front.

    Bodies without a length (chunked) are counted while read where it matters (POST points).
    """

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                    detail = f"body of {int(value)} bytes exceeds body_limit_bytes={self.limit}"
                    response = JSONResponse(_body(413, "too_large", detail), status_code=413)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
