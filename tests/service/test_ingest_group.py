"""The ingest path at fleet scale: group commit and the per-process rule-state cache.

GroupCommit runs many requests' jobs in one transaction and answers each after it commits; a
failing job gets its own error while the others are stored. Two rule engines with their own
caches (two service processes) alternating on one run judge it exactly as one engine does,
and a rolled-back batch leaves no trace in the cache.
"""

from __future__ import annotations

import json
import threading

import pytest
from helpers.feed import S, alerts
from sqlalchemy import text

from logitwatch.protocol import Batch
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.store import ingest_batch
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
