"""Throwaway PostgreSQL databases on 127.0.0.1:5432 (user postgres, trust auth)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg

__all__ = ["PG_ADMIN", "fresh_database"]

PG_HOST = os.environ.get("LOGITWATCH_TEST_PG_HOST", "127.0.0.1")
PG_ADMIN = f"host={PG_HOST} port=5432 user=postgres dbname=postgres"


@contextlib.contextmanager
def fresh_database(prefix: str = "lwtest") -> Iterator[str]:
    """Create an empty database, yield its SQLAlchemy URL, drop it afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{PG_HOST}:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database_url(kind: str, directory, prefix: str = "lwtest") -> Iterator[str]:
    """``kind`` "sqlite": a file in ``directory``; otherwise a fresh PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'lw.db'}"
    else:
        with fresh_database(prefix) as url:
            yield url
