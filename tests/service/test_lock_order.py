"""Writers of one PostgreSQL database never deadlock: each takes a run's row lock before it
writes anything of the run, and several runs' locks in name order; a transaction PostgreSQL
aborts for a conflict anyway runs again in the group commit.

The two lock-order tests stop one transaction at its first lock wait (seen in
pg_stat_activity) and then make the other one take what the first would have held under the
old order: without the order, PostgreSQL reports a deadlock and aborts one of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from helpers.feed import S
from helpers.server import thread_server
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from logitwatch.protocol import Batch, encode_batch
from logitwatch.service.app import create_app
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.settings import load_settings
from logitwatch.service.store import ingest_batch, reports
from logitwatch.service.store.db import (
    CONFLICT_TRIES,
    WRITE,
    GroupCommit,
    Writer,
    is_conflict,
    make_engine,
    make_sessionmaker,
)


@pytest.fixture
def writes(pg_url):
    engine = make_engine(pg_url)
    yield make_sessionmaker(engine.execution_options(**{WRITE: True}))
    engine.dispose()


def _chunks(seq: int, first: int, n_layers: int = 4) -> Batch:
    """A batch of two steps per series: stored as chunks, with the series' latest rows."""
    steps = [first, first + 1]
    series = [S("act.rms", steps, [1.0, 2.0], layer=i) for i in range(n_layers)]
    return Batch("c", seq, 0, [S("loss", steps, [2.0, 1.9]), *series])


def _report(seq: int, step: int) -> Batch:
    """One point for each of 9 series (8 or more): stored as a row of reports."""
    layers = [S("act.rms", [step], [1.0], layer=i) for i in range(8)]
    return Batch("c", seq, 0, [S("loss", [step], [2.0]), *layers])


class _Waiter(threading.Thread):
    """Runs `work(session)` and commits in a session of its own; `pid` is its backend."""

    def __init__(self, writes, work: Callable):
        super().__init__(daemon=True)
        self._writes, self._work = writes, work
        self.pid: int | None = None
        self.result = self.error = None
        self.started_work = threading.Event()

    def run(self) -> None:
        try:
            with self._writes() as s:
                self.pid = s.execute(text("SELECT pg_backend_pid()")).scalar_one()
                self.started_work.set()
                self.result = self._work(s)
                s.commit()
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.started_work.set()


def _wait_until_blocked(writes, waiter: _Waiter) -> None:
    """Return once `waiter`'s transaction waits for a lock (or fail after 20 s)."""
    assert waiter.started_work.wait(20)
    deadline = time.monotonic() + 20
    with writes() as s:
        while time.monotonic() < deadline:
            state = s.execute(
                text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :p"),
                {"p": waiter.pid},
            ).scalar()
            s.rollback()  # a fresh snapshot of pg_stat_activity each time
            if state == "Lock":
                return
            assert waiter.is_alive(), f"it finished without waiting: {waiter.error!r}"
            time.sleep(0.01)
    raise AssertionError("the second writer never waited for a lock")


def test_a_batch_sent_to_two_processes_waits_for_the_run_not_for_the_other(writes, run_name):
    with writes() as s:
        ingest_batch(s, run=run_name, batch=_chunks(1, 0))
        s.commit()
    # Process B stores batch 2 (its group's first) and has not committed yet...
    b = writes()
    try:
        assert not ingest_batch(b, run=run_name, batch=_chunks(2, 2)).duplicate
        # ... while process A starts on batch 3, which the client also sent to B.
        a = _Waiter(writes, lambda s: ingest_batch(s, run=run_name, batch=_chunks(3, 4)))
        a.start()
        _wait_until_blocked(writes, a)
        # A waits for the run and holds nothing of it, so B stores batch 3 too.
        assert not ingest_batch(b, run=run_name, batch=_chunks(3, 4)).duplicate
        b.commit()
    finally:
        b.close()
    a.join(20)
    assert a.error is None and a.result.duplicate
    with writes() as s:
        n = s.execute(
            text("SELECT count(*) FROM batches JOIN runs ON runs.id = run_id WHERE name = :r"),
            {"r": run_name},
        ).scalar_one()
    assert n == 3


def test_a_flush_of_several_runs_takes_them_in_the_order_ingest_does(writes, run_name):
    # "-b" is made first: the smaller id and the larger name.
    runs = {name: f"{run_name}-{name}" for name in ("b", "a")}
    with writes() as s:
        for name in runs.values():
            for step in range(3):
                assert ingest_batch(s, run=name, batch=_report(step + 1, step)).report
        s.commit()
        ids = {k: s.execute(text("SELECT id FROM runs WHERE name = :n"), {"n": v}).scalar_one()
               for k, v in runs.items()}  # fmt: skip
    assert ids["b"] < ids["a"]
    # One group commit stores a chunk batch of run "-a" (its reports become chunks first)...
    x = writes()
    try:
        assert ingest_batch(x, run=runs["a"], batch=_chunks(10, 3)).flushed
        # ... while the compactor flushes both runs' reports.
        y = _Waiter(writes, lambda s: reports.flush(s, [ids["b"], ids["a"]]))
        y.start()
        _wait_until_blocked(writes, y)
        # The flush waits for "-a" first and holds nothing of "-b": the group goes on to it.
        ingest_batch(x, run=runs["b"], batch=_chunks(10, 3))
        x.commit()
    finally:
        x.close()
    y.join(20)
    assert y.error is None and y.result == []  # the group had flushed both runs
    with writes() as s:
        left = s.execute(
            text("SELECT count(*) FROM reports WHERE run_id IN (:a, :b)"), ids
        ).scalar_one()
        loss_points = s.execute(
            text(
                "SELECT sum(n) FROM chunks JOIN series ON series.id = series_id"
                " WHERE series.run_id = :r AND metric = 'loss'"
            ),
            {"r": ids["a"]},
        ).scalar_one()
    assert left == 0 and loss_points == 3 + 2


def _deadlock() -> OperationalError:
    """What SQLAlchemy raises when PostgreSQL aborts a transaction to break a deadlock."""
    return OperationalError("UPDATE ...", {}, psycopg.errors.DeadlockDetected("deadlock detected"))


def test_a_conflict_is_told_from_other_errors():
    assert is_conflict(_deadlock())
    assert is_conflict(psycopg.errors.SerializationFailure("could not serialize access"))
    assert not is_conflict(OperationalError("SELECT 1", {}, psycopg.OperationalError("gone")))
    assert not is_conflict(ValueError("bad batch"))


def test_a_group_aborted_for_a_conflict_runs_again_and_other_errors_do_not(pg_url, run_name):
    engine = make_engine(pg_url)
    group = GroupCommit(Writer(engine, make_sessionmaker(engine)))
    group.start()
    calls = {"conflict": 0, "bad": 0}

    def store_after_a_conflict(session):
        calls["conflict"] += 1
        stored = ingest_batch(session, run=run_name, batch=_report(1, 0))
        if calls["conflict"] < CONFLICT_TRIES:  # aborted, after it wrote: nothing is kept
            raise _deadlock()
        return stored

    def bad(_session):
        calls["bad"] += 1
        raise ValueError("bad batch")

    try:
        answer = group.submit(store_after_a_conflict).result(30)
        with pytest.raises(ValueError, match="bad batch"):
            group.submit(bad).result(30)
    finally:
        group.close()
    assert not answer.duplicate and calls["conflict"] == CONFLICT_TRIES
    assert calls["bad"] == 2  # its group, then alone: never for being a conflict
    with engine.connect() as c:
        n = c.execute(
            text("SELECT count(*) FROM batches JOIN runs ON runs.id = run_id WHERE name = :r"),
            {"r": run_name},
        ).scalar_one()
    engine.dispose()
    assert n == 1


@pytest.mark.parametrize("wrapped", [True, False], ids=["sqlalchemy", "psycopg"])
def test_a_write_that_keeps_conflicting_is_a_503_that_says_so(
    pg_url, run_name, monkeypatch, wrapped
):
    tries = []
    real = RuleEngine.ingest

    def conflicting(self, session, **kw):
        tries.append(kw["batch"].seq)
        real(self, session, **kw)  # written, then aborted: nothing of it may stay
        # A statement of SQLAlchemy's raises its wrapper; one sent straight to the driver
        # (sql.pg_execute) raises psycopg's own error.
        raise _deadlock() if wrapped else _deadlock().orig

    body = encode_batch(_report(1, 0))
    headers = {"content-type": "application/msgpack"}
    with thread_server(create_app(load_settings(db_url=pg_url))) as server, server.client() as c:
        monkeypatch.setattr(RuleEngine, "ingest", conflicting)
        r = c.post(f"/api/v1/runs/{run_name}/points", content=body, headers=headers)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == "unavailable"
        assert "write conflict (deadlock detected): nothing was stored" in str(r.json()["detail"])
        # the group, then the request alone: each run CONFLICT_TRIES times
        assert len(tries) == 2 * CONFLICT_TRIES
        monkeypatch.setattr(RuleEngine, "ingest", real)
        r = c.post(f"/api/v1/runs/{run_name}/points", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["duplicate"] is False
