"""Engines, sessions and migrations for SQLite (WAL, the embedded default) and PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "WRITE",
    "Writer",
    "is_postgres",
    "make_engine",
    "make_sessionmaker",
    "sqlite_path",
    "upgrade",
]

#: Execution option that makes an SQLite transaction take the write lock at BEGIN
#: (BEGIN IMMEDIATE): two writers then queue on busy_timeout instead of one of them failing
#: with "database is locked" when it upgrades a read lock.
WRITE = "logitwatch_write"
_BUSY_TIMEOUT_MS = 30_000


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (None for PostgreSQL or an in-memory database)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database).expanduser()


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL, busy_timeout, foreign keys and explicit BEGIN handling."""
    u = make_url(url)
    if u.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16)
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        pool_size=8,
        max_overflow=16,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # pysqlite's own transaction handling is off; SQLAlchemy's "begin" event emits BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # Takes effect only on a new, empty file (before the migration creates tables): the
        # compactor then hands the pages of replaced chunks back to the file system.
        cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across application crashes in WAL mode; only power loss can
        # drop the last commits, and it keeps a commit to one write instead of two fsyncs.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA cache_size=-65536")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        immediate = conn.get_execution_options().get(WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def make_sessionmaker(engine: Engine, cache: dict | None = None) -> sessionmaker[Session]:
    """Sessions on `engine` sharing one id cache (`info["cache"]`, per process).

    Ids found or created in a transaction wait in `info["pending"]` and join the cache
    only when it commits, so a rolled-back insert never leaves a dangling id behind.
    """
    maker = sessionmaker(
        engine, expire_on_commit=False, info={"cache": {} if cache is None else cache}
    )

    @event.listens_for(maker, "after_commit")
    def _commit(session: Session) -> None:
        pending = session.info.pop("pending", None)
        if pending:
            session.info["cache"].update(pending)

    @event.listens_for(maker, "after_rollback")
    def _rollback(session: Session) -> None:
        session.info.pop("pending", None)

    return maker


class Writer:
    """Write transactions the way every writer of one process takes them.

    SQLite has one writer: this process's writers queue on a plain lock rather than on the
    database's busy handler, and each transaction takes the write lock at BEGIN (``WRITE``).
    PostgreSQL writers run concurrently.

    >>> from sqlalchemy import create_engine
    >>> engine = create_engine("sqlite://")
    >>> writer = Writer(engine, make_sessionmaker(engine))
    >>> with writer() as session:
    ...     session.commit()
    """

    def __init__(self, engine: Engine, reads: sessionmaker[Session]) -> None:
        # Writes share the read sessions' id cache, so ids found by either serve both.
        self.sessionmaker = make_sessionmaker(
            engine.execution_options(**{WRITE: True}), cache=reads.kw["info"]["cache"]
        )
        self.lock: contextlib.AbstractContextManager = (
            contextlib.nullcontext() if is_postgres(engine) else threading.Lock()
        )

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Session]:
        """One write session; the caller commits (closing without a commit rolls back)."""
        with self.lock, self.sessionmaker() as session:
            yield session


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations up to `revision` (safe to call from several processes)."""
    from alembic import command
    from alembic.config import Config

    here = Path(__file__).resolve().parent
    cfg = Config(str(here / "alembic.ini"))
    cfg.set_main_option("script_location", str(here / "migrations"))
    cfg.attributes["url"] = url
    command.upgrade(cfg, revision)
