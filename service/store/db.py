"""Engines, sessions and migrations for SQLite (WAL, the embedded default) and PostgreSQL."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.service.store.deferred import pipeline_deferred

__all__ = [
    "CONFLICT_TRIES",
    "WRITE",
    "GroupCommit",
    "Writer",
    "is_conflict",
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
        engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16)
        pipeline_deferred(engine)
        return engine
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
        # A commit checkpoints once the log holds 20,000 pages (80 MB) instead of 1,000:
        # the service's Checkpointer copies the log off the commit path well before that,
        # and the commits of other processes (a CLI import) copy the pages every group
        # commit rewrites (latest values, rule state, index pages) once per 80 MB of log,
        # not once per 4. The WAL file is cut back to 64 MB after a checkpoint that outgrew
        # it.
        cur.execute("PRAGMA wal_autocheckpoint=20000")
        cur.execute("PRAGMA journal_size_limit=67108864")
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

    def held(self) -> HeldSession:
        """A write session and its connection kept for transaction after transaction, by
        one thread (GroupCommit's): see HeldSession."""
        return HeldSession(self)


class HeldSession:
    """One thread's write session bound to one connection, kept between transactions.

    A Session and its Connection each join the engine's and the sessionmaker's event
    listeners when made, and those objects form reference cycles: a session per group
    commit left ~44 objects a request to the cyclic collector, whose young collections
    then ran every ~1,000 requests for 30-60 ms each, stalling every request in flight
    (the fleet's p99), measured. Kept, they are made once; each transaction still begins
    and ends as a fresh session's would (identity map emptied, the connection's
    transaction committed or rolled back). After a database error the session and
    connection are dropped, and the next transaction makes new ones (the pool checks a new
    connection).
    """

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._conn: Any = None
        self._session: Session | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Session]:
        """The write session, under the writer's lock; the caller commits (leaving
        without a commit rolls back)."""
        with self._writer.lock:
            if self._session is None:
                maker = self._writer.sessionmaker
                self._conn = maker.kw["bind"].connect()
                self._session = maker(bind=self._conn)
            session = self._session
            try:
                yield session
            except DBAPIError:  # the connection may be gone (a database restart)
                self.close()
                raise
            finally:
                # What was not committed is rolled back, and its ids never join the cache
                # (make_sessionmaker's "pending"); the identity map is emptied.
                session.info.pop("pending", None)
                if self._session is not None:
                    try:
                        session.close()
                    except Exception:
                        self.close()
                        raise

    def close(self) -> None:
        session, conn, self._session, self._conn = self._session, self._conn, None, None
        with contextlib.suppress(Exception):
            if session is not None:
                session.close()
        with contextlib.suppress(Exception):
            if conn is not None:
                conn.close()


#: A unit of work of one request: runs inside the group's transaction, returns its answer.
Job = Callable[[Session], Any]


class GroupCommit:
    """Group commit: one thread runs the jobs of many concurrent requests in one transaction.

    Each job's future is settled after the transaction that ran it commits, so a request is
    answered only once its batch is durable: a crash before the commit loses the whole group
    and every client sends again (exactly-once is the store's idempotency record, unchanged).
    If a job raises, the group rolls back and each of its jobs runs again in a transaction of
    its own: the failing request gets its error, the others their answers. ``begin`` runs
    once per transaction before its jobs (reads they need, sent in one round trip) and
    ``finish`` once after them (the answers' firing alerts: one query, not one each).

    >>> from sqlalchemy import create_engine
    >>> engine = create_engine("sqlite://")
    >>> group = GroupCommit(Writer(engine, make_sessionmaker(engine)))
    >>> group.start(); group.submit(lambda session: 42).result(); group.close()
    42
    """

    def __init__(
        self,
        writer: Writer,
        *,
        begin: Callable[[Session, list[Job]], None] | None = None,
        finish: Callable[[Session, list[Any]], list[Any]] | None = None,
        max_jobs: int = 256,
    ) -> None:
        self._writer = writer
        self._begin = begin or (lambda _session, _jobs: None)
        self._finish = finish or (lambda _session, answers: answers)
        # Bounded so one transaction (and the lock SQLite's other writers wait on) stays short.
        self._max_jobs = max_jobs
        self._queue: list[tuple[str, Job, Future]] = []
        self._mutex = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = writer.held()

    def submit(self, job: Job, *, order: str = "") -> Future:
        """Queue `job`; the future holds its answer (after commit) or its exception.

        A group runs its jobs sorted by `order` (the run's name), in arrival order within
        one: processes that take row locks run by run then take them in one global order.
        """
        future: Future = Future()
        with self._mutex:
            if self._thread is None:
                raise RuntimeError("the group committer is not running")
            self._queue.append((order, job, future))
        self._ready.set()
        return future

    def start(self) -> None:
        with self._mutex:
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._loop, name="logitwatch-group-commit", daemon=True
                )
                self._thread.start()

    def close(self) -> None:
        """Run what is queued, then stop."""
        with self._mutex:
            thread, self._thread = self._thread, None
        self._stop.set()
        self._ready.set()
        if thread is not None:
            thread.join(timeout=60)

    def _take(self) -> list[tuple[str, Job, Future]]:
        with self._mutex:
            work, self._queue = self._queue[: self._max_jobs], self._queue[self._max_jobs :]
            if not self._queue:
                self._ready.clear()
        return work

    def _loop(self) -> None:
        while True:
            self._ready.wait()
            work = self._take()
            if not work:
                if self._stop.is_set():
                    self._held.close()
                    return
                continue
            work.sort(key=lambda item: item[0])
            work = [(job, f) for _, job, f in work if f.set_running_or_notify_cancel()]
            for (_, future), (ok, answer) in zip(work, self.run([j for j, _ in work]), strict=True):
                if ok:
                    future.set_result(answer)
                else:
                    future.set_exception(answer)

    def run(self, jobs: list[Job]) -> list[tuple[bool, Any]]:
        """Run ``jobs`` (in this order) in one transaction, on the calling thread: each
        one's (True, answer) once it committed, or, when the group failed, each alone:
        (True, answer) or (False, its exception). What the committer's thread does with a
        group; an event loop that stores small batches itself (api/ingest.py) calls it."""
        try:
            return [(True, answer) for answer in self._commit(jobs)]
        except Exception:
            out: list[tuple[bool, Any]] = []
            for job in jobs:  # alone, each job either commits or carries its own error back
                try:
                    out.append((True, self._commit([job])[0]))
                except Exception as exc:
                    out.append((False, exc))
            return out

    def close_session(self) -> None:
        """Drop the kept session (GroupCommit.run's callers, at their end)."""
        self._held.close()

    def _commit(self, jobs: list[Job]) -> list[Any]:
        """Run ``jobs`` in one transaction and return their answers after the commit; a
        transaction PostgreSQL aborted to break a deadlock or a serialization conflict
        (nothing of it stored) runs again, up to CONFLICT_TRIES times in all."""
        for attempt in range(1, CONFLICT_TRIES + 1):
            try:
                with self._held() as session:
                    self._begin(session, jobs)
                    answers = self._finish(session, [job(session) for job in jobs])
                    session.commit()
                return answers
            except Exception as exc:
                if attempt == CONFLICT_TRIES or not is_conflict(exc):
                    raise
                time.sleep(random.uniform(0, 0.01 * attempt))  # the other one goes first
        raise AssertionError("unreachable")


#: How many times GroupCommit runs a transaction that PostgreSQL aborted for a conflict.
CONFLICT_TRIES = 5
#: SQLSTATEs of a transaction aborted only for another's sake: serialization_failure,
#: deadlock_detected. Running it again is the documented remedy.
_CONFLICTS = frozenset({"40001", "40P01"})


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` is PostgreSQL aborting a transaction to break a deadlock or a
    serialization conflict: nothing of it was stored, and it may simply run again."""
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None) in _CONFLICTS


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
