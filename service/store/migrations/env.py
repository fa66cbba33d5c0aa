"""Alembic environment: the URL comes from the caller (db.upgrade), never from alembic.ini."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

# rule_tables is imported for its side effect: its tables register on Base.metadata, so
# autogenerate (and `alembic check`) compares every table the migrations create.
import logitwatch.service.store.rule_tables  # noqa: F401
from logitwatch.service.store.db import WRITE, make_engine
from logitwatch.service.store.models import Base

target_metadata = Base.metadata
# Several service processes may start at once; a PostgreSQL advisory lock makes the
# second wait for the first instead of creating the same tables twice.
_PG_LOCK_KEY = 0x6C6F6769  # 'logi'


def _url() -> str:
    url = context.config.attributes.get("url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: call logitwatch.service.store.db.upgrade(url)")
    return url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    try:
        # On SQLite, BEGIN IMMEDIATE serializes concurrent upgrades the same way.
        with engine.connect().execution_options(**{WRITE: True}) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            context.configure(connection=conn, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
