"""The FastAPI application factory: create_app(settings); no module-level app or engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from logitwatch.service.api import docs, prom
from logitwatch.service.api.errors import BodyLimit, install_error_handlers
from logitwatch.service.api.ingest import Ingest
from logitwatch.service.api.main import api_router
from logitwatch.service.rules.alertmanager import alertmanager_sender
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.rules.notify import Notifier
from logitwatch.service.settings import Settings, load_settings
from logitwatch.service.store.compact import Compactor
from logitwatch.service.store.db import Writer, make_engine, make_sessionmaker

__all__ = ["app_from_env", "create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service on `settings.db_url` (migrated beforehand: db.upgrade or `logitwatch db upgrade`).

    What the endpoints use lives on ``app.state`` and reaches them only through
    ``logitwatch.service.api.deps``.
    """
    settings = settings or load_settings()
    engine = make_engine(settings.db_url)
    reads = make_sessionmaker(engine)
    writer = Writer(engine, reads)
    rules = RuleEngine(
        writer.sessionmaker,
        notifier=Notifier(
            writer.sessionmaker,
            urls=settings.webhook_urls,
            dashboard_url=settings.dashboard_url,
            alertmanager=alertmanager_sender(writer.sessionmaker, settings),
        ),
    )
    compactor = Compactor(writer.sessionmaker, writer.lock)
    ingest = Ingest(writer, rules, compactor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        compactor.start()
        rules.start()
        ingest.start()
        yield
        ingest.close()
        rules.close()
        compactor.close()
        engine.dispose()

    app = FastAPI(
        title="logitwatch",
        version="0.1.0",
        summary="Training-stability metrics for LLM pre-training",
        lifespan=lifespan,
        # Served by docs.install from local files: FastAPI's own pages load them from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = reads
    app.state.writer = writer
    app.state.rules = rules
    app.state.compactor = compactor
    app.state.ingest = ingest

    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.body_limit_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.include_router(api_router)
    prom.install(app, settings)
    docs.install(app)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (`logitwatch.service.app:app_from_env`): settings from LOGITWATCH_*."""
    return create_app(load_settings())
