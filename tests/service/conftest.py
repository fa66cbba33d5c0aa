"""Fixtures for service tests: a migrated database on SQLite and on PostgreSQL, sessions, a live app.

`db_url` is parametrized: every test that uses it runs on SQLite (a fresh file per test)
and on the real PostgreSQL at 127.0.0.1:5432 (one fresh database per test session,
dropped at the end; tests keep apart by using their own run names, see `run_name`).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import httpx
import pytest
from helpers.pg import fresh_database
from helpers.server import thread_server

from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings
from logitwatch.service.store.db import make_engine, make_sessionmaker, upgrade


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory) -> str:
    # Migrating once and copying the file keeps each test's fresh database cheap.
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return str(path)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with fresh_database("lwtest_service") as url:
        upgrade(url)
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path, _sqlite_template) -> str:
    """URL of a migrated database: SQLite file or the session's PostgreSQL database."""
    if request.param == "sqlite":
        path = tmp_path / "logitwatch.db"
        shutil.copy(_sqlite_template, path)
        return f"sqlite:///{path}"
    return request.getfixturevalue("pg_url")


#: The dashboard URL of the ``linked`` service: alerts link to it.
GRAFANA = "http://grafana.example:3000"


@pytest.fixture
def linked(db_url) -> Iterator[httpx.Client]:
    """A real server whose alerts carry dashboard links (``GRAFANA``), and a client of it."""
    app = create_app(load_settings(db_url=db_url, dashboard_url=GRAFANA))
    with thread_server(app) as server, server.client() as c:
        yield c


@pytest.fixture
def run_name() -> str:
    """A run name no other test uses (the PostgreSQL database is shared by the session)."""
    return f"run-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def sessions(db_url):
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def settings(db_url):
    return load_settings(db_url=db_url)


@pytest.fixture
def client(settings) -> Iterator[httpx.Client]:
    """An httpx client on the app served by a real uvicorn on a free loopback port."""
    app = create_app(settings)
    with thread_server(app) as server, server.client() as c:
        c.app = app
        yield c
