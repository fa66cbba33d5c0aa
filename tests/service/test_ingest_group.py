"""The ingest path at fleet scale: group commit and the per-process rule-state cache.

GroupCommit runs many requests' jobs in one transaction and answers each after it commits; a
failing job gets its own error while the others are stored. Two rule engines with their own
caches (two service processes) alternating on one run judge it exactly as one engine does,
and a rolled-back batch leaves no trace in the cache.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from dataclasses import dataclass
from typing import Any

import pytest
from helpers.feed import S, alerts
from sqlalchemy import text
from sqlalchemy.orm import Session

from logitwatch.protocol import Batch
from logitwatch.service.api.ingest import Ingest, _Job
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.settings import load_settings
from logitwatch.service.store import ingest_batch, prepare_batch
from logitwatch.service.store.compact import Compactor
from logitwatch.service.store.db import WRITE, GroupCommit, Writer, make_engine, make_sessionmaker
from logitwatch.service.store.limits import LimitError


@pytest.fixture
def engines(db_url):
    """Two engines on one database, each with its own id and rule-state cache (a process)."""
    made = [make_engine(db_url) for _ in range(2)]
    yield made
    for e in made:
        e.dispose()


def _writer_sm(engine):
    return make_sessionmaker(engine.execution_options(**{WRITE: True}))


def _batch(seq: int, step: int, loss: float, client: str = "c") -> Batch:
    return Batch(client, seq, 0, [S("loss", [step], [loss]), S("lr", [step], [1e-3])])


def _loss(step: int) -> float:
    return 2.0 + 0.01 * ((step * 7919) % 13) + (30.0 if step == 45 else 0.0)


def _send(sm, engine: RuleEngine, run: str, batch: Batch, *, commit: bool = True) -> None:
    with sm() as s:
        if not ingest_batch(s, run=run, batch=batch).duplicate:
            engine.on_batch(s, run=run, batch=batch)
        if commit:
            s.commit()


def _states(sm, run: str) -> dict:
    with sm() as s:
        rows = s.execute(
            text(
                "SELECT series_key, segment, state FROM rule_state JOIN runs ON runs.id = run_id"
                " WHERE runs.name = :run AND series_key <> ''"
            ),
            {"run": run},
        ).all()
    return {key: (seg, _no_ids(state)) for key, seg, state in rows}


def _no_ids(state) -> dict:
    """A row's state with open alerts' ids (which differ from run to run) left out."""
    state = json.loads(state) if isinstance(state, str) else state
    return {rule: {k: v for k, v in st.items() if k != "open"} for rule, st in state.items()}


def _judged(sm, run: str) -> list:
    return sorted((a["rule"], a["state"], a["first_step"]) for a in alerts(sm, run))


def test_two_processes_alternating_judge_a_run_as_one_does(engines, run_name):
    one_sm = _writer_sm(engines[0])
    one = RuleEngine(one_sm)
    pair = [(sm, RuleEngine(sm)) for sm in (_writer_sm(e) for e in engines)]
    for step in range(60):
        _send(one_sm, one, f"{run_name}-one", _batch(step + 1, step, _loss(step)))
        sm, engine = pair[step % 2]  # each process keeps its own cache of the run's rows
        _send(sm, engine, f"{run_name}-two", _batch(step + 1, step, _loss(step)))
    judged = _judged(one_sm, f"{run_name}-one")
    assert ("loss-spike", "firing", 45) in judged or ("loss-spike", "resolved", 45) in judged
    assert _judged(one_sm, f"{run_name}-two") == judged
    assert _states(one_sm, f"{run_name}-two") == _states(one_sm, f"{run_name}-one")


def test_a_rolled_back_batch_leaves_nothing_in_the_cache(engines, run_name):
    writer = _writer_sm(engines[0])
    engine, fresh = RuleEngine(writer), RuleEngine(writer)
    for step in range(50):
        batch = _batch(step + 1, step, _loss(step))
        if step % 5 == 3:  # evaluated, then the transaction fails: nothing happened
            _send(writer, engine, f"{run_name}-a", batch, commit=False)
        _send(writer, engine, f"{run_name}-a", batch)
        _send(writer, fresh, f"{run_name}-b", batch)
    assert _judged(writer, f"{run_name}-a") == _judged(writer, f"{run_name}-b")
    assert _states(writer, f"{run_name}-a") == _states(writer, f"{run_name}-b")
    assert _judged(writer, f"{run_name}-a")  # the spike at 45 was judged at all


@pytest.fixture
def group(db_url):
    engine = make_engine(db_url)
    g = GroupCommit(Writer(engine, make_sessionmaker(engine)))
    g.start()
    yield g
    g.close()
    engine.dispose()


def _store(run: str, batch: Batch, max_series: int = 100):
    return lambda session: ingest_batch(session, run=run, batch=batch, max_series=max_series)


def _held_jobs(group: GroupCommit, jobs: list) -> list:
    """Submit `jobs` while the committer is busy, so that they make one group."""
    started, release = threading.Event(), threading.Event()

    def hold(_session):
        started.set()
        release.wait(10)

    first = group.submit(hold)
    assert started.wait(10)
    futures = [group.submit(job, order=str(i)) for i, job in enumerate(jobs)]
    release.set()
    first.result(10)
    return futures


def test_a_group_stores_each_batch_once_and_answers_after_commit(group, sessions, run_name):
    one = _batch(1, 0, 2.0)
    futures = _held_jobs(group, [_store(run_name, one), _store(run_name, one),
                                 _store(run_name, _batch(2, 1, 2.0))])  # fmt: skip
    answers = [f.result(10) for f in futures]
    # The same (client, seq) twice in one transaction: stored by the first, a duplicate after.
    assert [a.duplicate for a in answers] == [False, True, False]
    with sessions() as s:
        n = s.execute(
            text("SELECT count(*) FROM batches JOIN runs ON runs.id = run_id WHERE name = :r"),
            {"r": run_name},
        ).scalar_one()
    assert n == 2


def test_a_failing_job_gets_its_error_and_the_others_are_stored(group, sessions, run_name):
    wide = Batch("w", 1, 0, [S("attn.logit_max", [0], [1.0], layer=i) for i in range(5)])
    futures = _held_jobs(group, [_store(f"{run_name}-ok", _batch(1, 0, 2.0)),
                                 _store(f"{run_name}-wide", wide, max_series=3),
                                 _store(f"{run_name}-ok2", _batch(1, 0, 2.0))])  # fmt: skip
    assert not futures[0].result(10).duplicate and not futures[2].result(10).duplicate
    with pytest.raises(LimitError, match="max_series_per_run=3"):
        futures[1].result(10)
    with sessions() as s:
        names = set(s.execute(text("SELECT name FROM runs")).scalars())
    assert {f"{run_name}-ok", f"{run_name}-ok2"} <= names and f"{run_name}-wide" not in names


@dataclass(slots=True, eq=False)
class _Held(_Job):
    """A job that holds the committer until released (the jobs after it make one group)."""

    started: threading.Event | None = None
    release: threading.Event | None = None

    def __call__(self, session):
        self.started.set()
        self.release.wait(10)
        return _Job.__call__(self, session)


def test_a_groups_reads_sent_ahead_judge_as_batches_one_by_one(db_url, run_name):
    """Ingest's groups (on PostgreSQL the batches' records and the runs' locks and rule-state
    rows read for the whole group in one round trip first): two reports of a run in one
    group, a resent one among them, runs new to the process; judged and stored as the same
    reports one transaction each."""
    engine = make_engine(db_url)
    writer = Writer(engine, make_sessionmaker(engine))
    rules = RuleEngine(writer.sessionmaker)
    ingest = Ingest(writer, rules, Compactor(writer.sessionmaker, writer.lock))
    settings = load_settings(db_url=db_url)
    pg = ingest.postgres
    ref, a, b, hold = (f"{run_name}-{x}" for x in ("ref", "a", "b", "hold"))

    def job(run: str, k: int) -> _Job:
        batch = _batch(k + 1, k, _loss(k))
        return _Job(rules, settings, run, batch, prepare_batch(batch, postgres=pg))

    ingest.start()
    try:
        for g in range(30):
            for k in (2 * g, 2 * g + 1):
                _send(
                    writer.sessionmaker,
                    RuleEngine(writer.sessionmaker),
                    ref,
                    _batch(k + 1, k, _loss(k)),
                )
            jobs = [job(a, 2 * g), job(a, 2 * g + 1), job(a, 2 * g)]
            # Every third group a run new to the process, between a and b by name: it and the
            # jobs after it go the plain way (no run row locked before the new run's).
            fresh = g % 3 == 2
            if fresh:
                jobs.append(job(f"{a}2new{g}", 0))
            jobs += [job(b, 2 * g), job(b, 2 * g + 1)]
            started, release = threading.Event(), threading.Event()
            h = job(hold, g)
            held = _Held(h.rules, h.settings, h.run, h.batch, h.prepared, None, started, release)
            first = ingest.group.submit(held)
            assert started.wait(10)  # the committer is busy: the jobs make one group
            futures = [ingest.group.submit(j, order=str(i)) for i, j in enumerate(jobs)]
            release.set()
            first.result(10)
            answers = [f.result(10).result for f in futures]
            assert [r.duplicate for r in answers] == [False, False, True] + [False] * (
                len(jobs) - 3
            )
            ahead = [j.ahead for j in jobs]
            if pg and g > 0:  # a's reads went ahead; b's too unless a new run came first
                assert [x[0] for x in ahead[:3]] == [True, True, False]
                assert [x[1] is not None for x in ahead[:3]] == [True, False, False]
                if fresh:
                    assert ahead[3:] == [None, None, None]
                else:
                    assert [x[0] for x in ahead[3:]] == [True, True]
                    assert [x[1] is not None for x in ahead[3:]] == [True, False]
            else:
                assert ahead == [None] * len(jobs)
    finally:
        ingest.close()
        engine.dispose()
    sm = _writer_sm(make_engine(db_url))
    judged = _judged(sm, ref)
    assert ("loss-spike", "firing", 45) in judged or ("loss-spike", "resolved", 45) in judged
    assert _judged(sm, a) == judged and _judged(sm, b) == judged
    assert _states(sm, a) == _states(sm, ref) and _states(sm, b) == _states(sm, ref)
    # The runs' own rows too: one epoch a batch, each job's reads after the one before
    assert _run_row(sm, a) == _run_row(sm, ref) == _run_row(sm, b)
    assert _run_row(sm, ref)[0] == 60


def _run_row(sm, run: str) -> tuple:
    """(epoch, state) of the run's own rule_state row, the absent rules' clock times left out."""
    with sm() as s:
        epoch, state = s.execute(
            text(
                "SELECT last_step, state FROM rule_state JOIN runs ON runs.id = run_id"
                " WHERE runs.name = :run AND series_key = ''"
            ),
            {"run": run},
        ).one()
    state = json.loads(state) if isinstance(state, str) else state
    return epoch, {k: v for k, v in state.items() if k != "seen"}


def test_the_committer_keeps_one_session_and_leaves_no_cycles(group, run_name):
    """Its groups run on one Session and connection, kept between transactions: a Session
    made per group left ~44 objects in reference cycles, whose collection stalled requests."""
    seen = []

    def store(step):
        def job(session):
            seen.append((id(session), id(session.connection())))
            return _store(run_name, _batch(step + 1, step, 2.0))(session)

        return job

    group.submit(store(0)).result(10)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for step in range(1, 20):
            group.submit(store(step)).result(10)
        gc.collect()
        # Ours: sessions of this committer's sessionmaker (its id cache), not another test's.
        cache = group._writer.sessionmaker.kw["info"]["cache"]
        ours = [o for o in gc.garbage if isinstance(o, Session) and o.info.get("cache") is cache]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert len(set(seen)) == 1
    assert ours == []


def test_a_connection_lost_between_groups_is_replaced(group, sessions, run_name):
    """The kept connection dies while idle (a database restart): the next group fails on
    it, and its jobs run again on a new connection; nothing is lost."""
    driver = []

    def first(session):
        driver.append(session.connection().connection.driver_connection)
        return _store(run_name, _batch(1, 0, 2.0))(session)

    group.submit(first).result(10)
    driver[0].close()
    futures = _held_jobs(group, [_store(run_name, _batch(2, 1, 2.0)),
                                 _store(run_name, _batch(3, 2, 2.0))])  # fmt: skip
    assert [f.result(10).duplicate for f in futures] == [False, False]
    with sessions() as s:
        n = s.execute(
            text("SELECT count(*) FROM batches JOIN runs ON runs.id = run_id WHERE name = :r"),
            {"r": run_name},
        ).scalar_one()
    assert n == 3


def _spied_ingest(db_url: str) -> tuple[Ingest, list[str], Any]:
    """An Ingest (not started) whose loop and thread groups record where each group ran and
    how many jobs it held, and its engine."""
    engine = make_engine(db_url)
    writer = Writer(engine, make_sessionmaker(engine))
    compactor = Compactor(writer.sessionmaker, writer.lock)
    ingest = Ingest(writer, RuleEngine(writer.sessionmaker), compactor)
    groups: list[str] = []
    if ingest._on_loop is not None:
        for where, group in (("loop", ingest._on_loop._group), ("thread", ingest.group)):
            run = group.run
            group.run = lambda jobs, run=run, where=where: (
                groups.append(f"{where} {len(jobs)}") or run(jobs)
            )
    return ingest, groups, engine


def _serve(ingest: Ingest, engine: Any, main: Any) -> Any:
    """asyncio.run(main()) with the ingest started, closed after."""
    ingest.start()
    try:
        return asyncio.run(main())
    finally:
        ingest.close()
        engine.dispose()


def test_on_sqlite_the_loop_stores_small_batches_a_group_an_iteration(db_url, run_name):
    """SQLite: the small batches whose handlers the event loop ran together are stored by
    the loop in one transaction; a failing one gets its error and the others are stored;
    a big batch goes to the committer's thread."""
    ingest, groups, engine = _spied_ingest(db_url)
    if ingest.postgres:
        assert ingest._on_loop is None  # PostgreSQL: every group on the committer's thread
        engine.dispose()
        return
    settings = load_settings(db_url=db_url, max_series_per_run=3)

    def store(run: str, batch: Batch, small: bool = True):
        return ingest.store(settings, run, batch, prepare_batch(batch, postgres=False), small)

    wide = Batch("w", 1, 0, [S("attn.logit_max", [0], [1.0], layer=i) for i in range(5)])

    async def main():
        first = await asyncio.gather(
            store(f"{run_name}-a", _batch(1, 0, 2.0)),
            store(f"{run_name}-b", _batch(1, 0, 2.0)),
            store(f"{run_name}-wide", wide),
            store(f"{run_name}-c", _batch(1, 0, 2.0)),
            return_exceptions=True,
        )
        big = await store(f"{run_name}-a", _batch(2, 1, 2.0), small=False)
        return first, big

    first, big = _serve(ingest, engine, main)
    assert [a["accepted"] for a in (first[0], first[1], first[3], big)] == [2, 2, 2, 2]
    assert isinstance(first[2], LimitError)
    # One group of the four (failed: each alone), then the big batch on the thread.
    assert groups == ["loop 4", "thread 1"]


def test_the_loop_hands_its_group_to_the_thread_while_the_lock_is_held(db_url, run_name):
    """SQLite: while another writer holds the lock longer than LOOP_WAIT_S (a deep
    compaction), the loop hands its group to the committer's thread, which stores it once
    the lock is free."""
    ingest, groups, engine = _spied_ingest(db_url)
    if ingest.postgres:
        engine.dispose()
        return  # no writer lock: PostgreSQL writers run side by side
    settings = load_settings(db_url=db_url)
    lock = ingest._on_loop._lock

    def store(run: str, seq: int):
        batch = _batch(seq, seq - 1, 2.0)
        return ingest.store(settings, run, batch, prepare_batch(batch, postgres=False), True)

    async def main():
        lock.acquire()
        tasks = [asyncio.create_task(store(f"{run_name}-{x}", 1)) for x in "ab"]
        for _ in range(5):  # the loop runs its group's turn: handed over after LOOP_WAIT_S
            await asyncio.sleep(0)
        assert not [g for g in groups if g.startswith("loop")]
        assert not any(t.done() for t in tasks)
        lock.release()
        first = await asyncio.gather(*tasks)
        later = await store(f"{run_name}-a", 2)  # the lock is free: on the loop again
        return first, later

    first, later = _serve(ingest, engine, main)
    assert [a["accepted"] for a in [*first, later]] == [2, 2, 2]
    assert groups[0].startswith("thread") and groups[-1] == "loop 1"


def test_a_postgresql_group_of_known_runs_takes_two_round_trips(pg_url, run_name, monkeypatch):
    """On PostgreSQL a group of reports from runs the process knows reads everything it
    needs in one round trip (the batches' records, the runs' locks and rule-state rows, the
    user rules' version) and sends its writes with the firing-alerts query in a second: a
    report's rule state, when cached, is not read, so nothing flushes the writes between
    jobs. The user rules read ahead are the ones in force: a rule another process puts is
    judged from the next group on."""
    from logitwatch.service.rules.model import parse_rules
    from logitwatch.service.rules.user import put_user_rules
    from logitwatch.service.store import deferred

    engine = make_engine(pg_url)
    writer = Writer(engine, make_sessionmaker(engine))
    rules = RuleEngine(writer.sessionmaker)
    ingest = Ingest(writer, rules, Compactor(writer.sessionmaker, writer.lock))
    settings = load_settings(db_url=pg_url)
    runs = [f"{run_name}-{i}" for i in range(4)]

    def group(step: int) -> list:
        jobs = []
        for run in runs:  # a report: one step of a few series, stored as one row
            heads = [S("attn.logit_max", [step], [10.0], layer="0", head=str(h)) for h in range(8)]
            batch = Batch("c", step + 1, 0, [S("loss", [step], [2.0]), *heads])
            jobs.append(_Job(rules, settings, run, batch, prepare_batch(batch, postgres=True)))
        out = ingest.group.run(jobs)
        assert all(ok for ok, _ in out), out
        return [answer for _, answer in out]

    sends = []
    original = deferred._send
    monkeypatch.setattr(
        deferred, "_send", lambda *a, **k: (sends.append(len(a[1])), original(*a, **k))[1]
    )
    other = make_engine(pg_url)
    try:
        group(0)  # new runs: made and read the plain way
        group(1)
        sends.clear()
        group(2)
        assert len(sends) == 2  # the reads ahead, then every job's writes at once
        assert sends[1] >= 2 * len(runs)  # (each report's row, its rule state, ...)
        seen = {"name": "loss-seen", "metric": "loss", "for_steps": 1,
                "condition": {"kind": "threshold", "op": ">", "value": 1.0}}  # fmt: skip
        with _writer_sm(other)() as s:  # another process puts a rule
            put_user_rules(s, rules=parse_rules([seen]))
            s.commit()
        answers = group(3)
        assert all("loss-seen" in {a["rule"] for a in d.alerts} for d in answers)
    finally:
        with _writer_sm(other)() as s:
            put_user_rules(s, rules=[])
            s.commit()
        other.dispose()
        ingest.close()
        engine.dispose()
