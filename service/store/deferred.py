"""PostgreSQL: the statements of a transaction whose results nobody reads, pipelined.

Storing and judging a report takes eight statements on PostgreSQL, and the ingest path
reads the results of three (the batch's record, the run's config, its rule-state row). Each
statement sent alone is a round trip the group commit's one thread waits for: half of its
time, measured. The others are deferred: queued on the connection, in order, and sent in
one pipeline (libpq's pipeline mode) with the next statement whose result is read
(pg_execute), with SQLAlchemy's next statement, or before the commit (pipeline_deferred's
events). Order within the transaction is unchanged; an error of a deferred statement is
raised by the statement it was sent with, and the transaction fails as it would have.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

__all__ = [
    "defer",
    "driver_rows",
    "flush_deferred",
    "pg_cursor",
    "pg_execute",
    "pg_rows",
    "pipeline_deferred",
]

_DEFERRED = "logitwatch_deferred"


def defer(session: Session, sql: str, params: Any) -> None:
    """PostgreSQL: run `sql` later in this transaction, before anything else reaches the
    database (its result is never read)."""
    session.connection().info.setdefault(_DEFERRED, []).append((sql, params))


def pg_cursor(session: Session) -> Any:
    """A psycopg cursor of the session's connection, once the deferred statements are sent
    (the caller closes it). For a statement whose result is read, see pg_execute."""
    conn = session.connection()
    flush_deferred(conn)
    return conn.connection.driver_connection.cursor()


def pg_execute(session: Session, sql: str, params: Any) -> Any:
    """Execute `sql` after the deferred statements, all in one round trip; its cursor, with
    the result (the caller closes it)."""
    conn = session.connection()
    raw = conn.connection.driver_connection
    cur = raw.cursor()
    queue = conn.info.get(_DEFERRED)
    try:
        if queue:
            _send(raw, queue, [(cur, sql, params)])
        else:
            cur.execute(sql, params)
    except BaseException:
        cur.close()
        raise
    return cur


def pg_rows(session: Session, *statements: tuple[str, Any]) -> list[list]:
    """The rows of each (sql, params), sent after the deferred statements and one another
    in one round trip (a pipeline), so in this order: for reads whose parameters do not
    depend on one another's results."""
    conn = session.connection()
    raw = conn.connection.driver_connection
    curs = [raw.cursor() for _ in statements]
    try:
        _send(
            raw,
            conn.info.setdefault(_DEFERRED, []),
            [(c, *st) for c, st in zip(curs, statements, strict=True)],
        )
        return [c.fetchall() for c in curs]
    finally:
        for c in curs:
            c.close()


def driver_rows(session: Session, pg: tuple[str, Any], sqlite: tuple[str, Any]) -> list:
    """The rows of one statement read by the driver on the session's connection, in its
    transaction: ``pg`` (sql, params) on PostgreSQL, sent with the deferred statements
    (pg_execute), else ``sqlite``. For hot-path reads where SQLAlchemy's statement costs
    more than the query."""
    if session.get_bind().dialect.name == "postgresql":
        cur = pg_execute(session, *pg)
    else:
        cur = session.connection().connection.driver_connection.cursor()
        cur.execute(*sqlite)
    try:
        return cur.fetchall()
    finally:
        cur.close()


def flush_deferred(conn: Any) -> None:
    """Send the deferred statements of SQLAlchemy connection `conn`, if any."""
    queue = conn.info.get(_DEFERRED)
    if queue:
        _send(conn.connection.driver_connection, queue)


def _send(raw: Any, queue: list, last: list[tuple] = ()) -> None:
    """The queued statements, then each (cursor, sql, params) of `last`, in one pipeline."""
    pending = queue[:]
    queue.clear()  # sent now; if that fails, the transaction is lost with them
    with raw.pipeline(), raw.cursor() as cur:
        for sql, params in pending:
            cur.execute(sql, params)
        for c, sql, params in last:
            c.execute(sql, params)


def pipeline_deferred(engine: Any) -> None:
    """Make `engine` (PostgreSQL) send a connection's deferred statements before any
    statement of SQLAlchemy's and before a commit, and drop them on a rollback."""

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn, _cursor, _statement, _params, _context, _many) -> None:
        flush_deferred(conn)

    @event.listens_for(engine, "commit")
    def _commit(conn) -> None:
        flush_deferred(conn)

    @event.listens_for(engine, "rollback")
    def _rollback(conn) -> None:
        conn.info.pop(_DEFERRED, None)

    @event.listens_for(engine.pool, "reset")
    def _reset(_dbapi_conn, record, _reset_state) -> None:
        record.info.pop(_DEFERRED, None)
