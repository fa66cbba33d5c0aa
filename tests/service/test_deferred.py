"""PostgreSQL statements whose results are never read are deferred (sql.defer) and sent in one
pipeline with the next statement: they still run in order, before anything else of the
transaction, and a rollback drops them."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text

from logitwatch.service.store.db import make_engine, make_sessionmaker
from logitwatch.service.store.deferred import defer, pg_cursor, pg_execute, pg_rows

_INSERT = "INSERT INTO lw_deferred (k, v) VALUES (%s, %s)"


@pytest.fixture
def sm(pg_url):
    engine = make_engine(pg_url)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE IF NOT EXISTS lw_deferred (k text PRIMARY KEY, v int)"))
        c.execute(text("TRUNCATE lw_deferred"))
    yield make_sessionmaker(engine)
    with engine.begin() as c:
        c.execute(text("DROP TABLE lw_deferred"))
    engine.dispose()


def _rows(sm) -> dict:
    with sm() as s:
        return dict(s.execute(text("SELECT k, v FROM lw_deferred")).all())


def test_deferred_statements_run_in_order_before_the_next_one(sm):
    with sm() as s:
        defer(s, _INSERT, ("a", 1))
        defer(s, "UPDATE lw_deferred SET v = v + 1 WHERE k = %s", ("a",))
        assert _rows(sm) == {}  # not sent yet, and this transaction has not committed
        # a statement whose result is read goes with them, after them
        with pg_execute(s, "SELECT v FROM lw_deferred WHERE k = %s", ("a",)) as cur:
            assert cur.fetchone() == (2,)
        defer(s, _INSERT, ("b", 1))
        assert s.execute(text("SELECT count(*) FROM lw_deferred")).scalar_one() == 2  # SQLAlchemy's
        defer(s, _INSERT, ("c", 1))
        with pg_cursor(s) as cur:  # a cursor of the caller's: the queue is sent first
            cur.execute("SELECT count(*) FROM lw_deferred")
            assert cur.fetchone() == (3,)
        defer(s, _INSERT, ("d", 1))
        s.commit()  # sent before the commit
    assert _rows(sm) == {"a": 2, "b": 1, "c": 1, "d": 1}


def test_several_reads_go_after_the_deferred_statements_and_in_order(sm):
    with sm() as s:
        defer(s, _INSERT, ("a", 1))
        select = "SELECT k, v FROM lw_deferred ORDER BY k"
        got = pg_rows(
            s, (select, ()), ("UPDATE lw_deferred SET v = 5 RETURNING v", ()), (select, ())
        )
        assert got == [[("a", 1)], [(5,)], [("a", 5)]]
        s.commit()
    assert _rows(sm) == {"a": 5}


def test_a_rollback_drops_what_was_deferred_and_the_connection_goes_on_clean(sm):
    with sm() as s:
        defer(s, _INSERT, ("a", 1))
        s.rollback()
        defer(s, _INSERT, ("b", 1))
        s.commit()
    with sm() as s:
        defer(s, _INSERT, ("c", 1))  # the session closes without a commit
    with sm() as s:  # the same pooled connection: nothing left over runs here
        s.execute(text("SELECT 1"))
        s.commit()
    assert _rows(sm) == {"b": 1}


def test_an_error_of_a_deferred_statement_fails_its_transaction(sm):
    with sm() as s:
        defer(s, _INSERT, ("a", 1))
        s.commit()
    with sm() as s:
        defer(s, _INSERT, ("b", 1))
        defer(s, _INSERT, ("a", 2))  # a duplicate key
        with pytest.raises(psycopg.errors.UniqueViolation):
            pg_execute(s, "SELECT 1", ()).close()
        s.rollback()
    assert _rows(sm) == {"a": 1}
