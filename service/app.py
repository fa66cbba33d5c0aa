"""The FastAPI application factory: create_app(settings); no module-level app or engine."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import api_alerts, api_health, api_points, api_rules, api_runs, prom
from .db import WRITE, is_postgres, make_engine, make_sessionmaker
from .errors import BodyLimit, install_error_handlers
from .evaluator import RuleEngine
from .notify import Notifier
from .settings import Settings, load_settings
from .store_compact import Compactor

__all__ = ["app_from_env", "create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service on `settings.db_url` (migrated beforehand: db.upgrade or `logitwatch db upgrade`)."""
    settings = settings or load_settings()
    engine = make_engine(settings.db_url)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.compactor.start()
        app.state.rules.start()
        yield
        app.state.rules.close()
        app.state.compactor.close()
        engine.dispose()

    app = FastAPI(
        title="logitwatch",
        version="0.1.0",
        summary="Training-stability metrics for LLM pre-training",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    # Writers take SQLite's write lock at BEGIN (see db.WRITE) and, within a process,
    # queue on a plain lock; PostgreSQL writers run concurrently.
    app.state.write_sessionmaker = make_sessionmaker(
        engine.execution_options(**{WRITE: True}), cache=app.state.sessionmaker.kw["info"]["cache"]
    )
    app.state.write_lock = contextlib.nullcontext() if is_postgres(engine) else threading.Lock()
    app.state.rules = RuleEngine(
        app.state.write_sessionmaker,
        notifier=Notifier(
            app.state.write_sessionmaker,
            urls=settings.webhook_urls,
            dashboard_url=settings.dashboard_url,
        ),
    )
    app.state.compactor = Compactor(app.state.write_sessionmaker, app.state.write_lock)

    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.body_limit_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.include_router(api_health.router)
    app.include_router(api_runs.router)
    app.include_router(api_points.router)
    app.include_router(api_alerts.router)
    app.include_router(api_rules.router)
    prom.install(app, settings)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (`logitwatch.service.app:app_from_env`): settings from LOGITWATCH_*."""
    return create_app(load_settings())
