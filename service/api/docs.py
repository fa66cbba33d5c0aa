"""The OpenAPI pages, /docs (Swagger UI) and /redoc, with their scripts served by the service
itself, so they render on a node without internet: the files come from `fastapi-offline`."""

from __future__ import annotations

import importlib.resources

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import HTMLResponse

__all__ = ["ASSETS_URL", "assets_dir", "install"]

#: Where the Swagger UI and ReDoc files are mounted.
ASSETS_URL = "/static/openapi-ui"


def assets_dir() -> str:
    """The folder of the pinned Swagger UI 5 / ReDoc 2 files that fastapi-offline ships."""
    # Its package data, not its FastAPIOffline factory: create_app keeps building the app.
    return str(importlib.resources.files("fastapi_offline") / "static")


def install(app: FastAPI) -> None:
    """Mount the assets and add /docs, its OAuth2 redirect and /redoc to an app made with
    ``docs_url=None, redoc_url=None``. Open routes, as FastAPI's own are (no auth dependency)."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="openapi-ui")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url

    def root(request: Request) -> str:
        # Behind a proxy with a path prefix the page must ask for the prefixed URLs.
        return request.scope.get("root_path", "").rstrip("/")

    async def swagger_ui(request: Request) -> HTMLResponse:
        prefix = root(request)
        return get_swagger_ui_html(
            openapi_url=prefix + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{prefix}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{prefix}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=prefix + redirect_url if redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        prefix = root(request)
        return get_redoc_html(
            openapi_url=prefix + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{prefix}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{prefix}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,  # a CDN stylesheet; ReDoc falls back to system fonts
        )

    # add_route, as FastAPI does for its own pages: plain routes, kept out of the schema.
    app.add_route("/docs", swagger_ui, include_in_schema=False)
    if redirect_url:
        app.add_route(redirect_url, swagger_ui_redirect, include_in_schema=False)
    app.add_route("/redoc", redoc, include_in_schema=False)
