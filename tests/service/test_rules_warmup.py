"""Warmup inferred from the lr series (runs that declare none), kept in the run's rule state."""

from __future__ import annotations

import json

import pytest
from helpers.feed import Feeder, S, alerts
from sqlalchemy import text

from logitwatch.service.rules.conditions import RunContext
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.rules.state import RUN_KEY
from logitwatch.service.rules.warmup import CAP, KEY, observe, warmup_end
from logitwatch.service.store.db import WRITE, make_engine, make_sessionmaker


@pytest.fixture
def writer(db_url):
    engine = make_engine(db_url)
    yield make_sessionmaker(engine.execution_options(**{WRITE: True}))
    engine.dispose()


def linear_warmup_then_cosine(steps, peak=1e-3, warmup=20):
    return [
        peak * (s + 1) / warmup if s < warmup else peak * (1 - 1e-4 * (s - warmup)) for s in steps
    ]


@pytest.mark.parametrize(
    ("points", "end"),
    [
        (list(zip(range(0, 60, 5), linear_warmup_then_cosine(range(0, 60, 5)), strict=True)), 20),
        ([(0, 1e-3), (1, 1e-3), (2, 1e-3)], 0),  # constant from step 0: no warmup
        ([(1, 1e-2), (2, 0.99e-2)], 0),  # Hugging Face's linear decay, no warmup
        ([(0, 1e-4), (10, 2e-4), (20, 2e-4)], 10),  # warmup to a constant LR
        ([(s, 1e-5 * (s + 1)) for s in range(0, 1500, 100)], CAP),  # still rising: capped
        ([(5000, 1e-3)], CAP),  # first seen long after any warmup
    ],
)
def test_the_end_of_warmup_is_where_the_lr_stops_rising(points, end):
    state: dict = {}
    observe(state, points)
    assert state[KEY]["end"] == end and warmup_end(state, 10**6) == end
    json.dumps(state, allow_nan=False)  # small and JSON-able
    assert len(state[KEY]) <= 5


def test_unknown_while_rising_capped_and_none_without_any_lr():
    state: dict = {}
    observe(state, [(0, 1e-4), (10, 2e-4)])
    assert state[KEY].get("end") is None
    assert warmup_end(state, 10) == 11  # everything so far is still warmup
    assert warmup_end(state, 5000) == CAP  # but never more than the cap
    assert warmup_end({}, 500) == 0  # a run that reports no lr: nothing to wait for
    observe(state, [(10, 9.0), (5, 9.0), (20, 1.9e-4)])  # repeated and earlier steps ignored
    assert state[KEY]["end"] == 10


def test_declared_warmup_wins_and_only_at_the_top_level():
    declared = RunContext.from_config({"schedule": {"kind": "cosine", "peak_lr": 1.0,
                                                    "warmup_steps": 7, "total_steps": 100}})  # fmt: skip
    assert (declared.warmup_steps, declared.warmup_declared) == (7, True)
    assert RunContext.from_config({"warmup_steps": 0}).warmup_declared
    # Hugging Face's training_args.warmup_steps is 0 even with warmup_ratio: not a declaration
    hf = RunContext.from_config({"training_args": {"warmup_steps": 0, "warmup_ratio": 0.1}})
    assert not hf.warmup_declared
    assert not RunContext.from_config({"warmup_steps": "soon"}).warmup_declared


def spike_run(f, spike_at, steps=range(0, 200, 2), lr=None):
    """A gently falling loss with one spike, reported with its LR every 2 steps."""
    steps = list(steps)
    loss = [3.0 - 0.002 * s + 0.01 * ((s * 7919) % 13 - 6) / 6 for s in steps]
    loss[steps.index(spike_at)] = 6.0
    for i in range(0, len(steps), 10):  # batches of 10 reports, as the agent sends them
        part = steps[i : i + 10]
        series = [S("loss", part, loss[i : i + 10])]
        if lr is not None:
            series.append(S("lr", part, [lr(s) for s in part], group="0"))
        f.send(*series)
    return [a for a in alerts(f.sm, f.run) if a["rule"] == "loss-spike"]


def test_rules_that_skip_warmup_wait_for_the_inferred_end(writer, run_name):
    """No schedule declared: the LR rises until step 40, so a spike at step 30 is warmup, one at
    step 120 is not; the inference sits in the run's own state row."""
    lr = lambda s: 1e-3 * min(1.0, (s + 1) / 41) * (1 - 1e-4 * max(0, s - 40))  # noqa: E731
    early = spike_run(Feeder(writer, RuleEngine(writer), run_name), 30, lr=lr)
    assert early == []
    late = spike_run(Feeder(writer, RuleEngine(writer), run_name + "-b"), 120, lr=lr)
    assert [a["first_step"] for a in late] == [120]
    with writer() as s:
        state = s.execute(
            text("SELECT rs.state FROM rule_state rs JOIN runs r ON r.id = rs.run_id"
                 " WHERE r.name = :run AND rs.series_key = :key"),
            {"run": run_name, "key": RUN_KEY},
        ).scalar_one()  # fmt: skip
    state = json.loads(state) if isinstance(state, str) else state
    assert state[KEY]["end"] == 40


def test_a_constant_lr_is_no_warmup_and_no_lr_at_all_neither(writer, run_name):
    constant = spike_run(Feeder(writer, RuleEngine(writer), run_name), 30, lr=lambda s: 1e-3)
    assert [a["first_step"] for a in constant] == [30]
    none = spike_run(Feeder(writer, RuleEngine(writer), run_name + "-b"), 30)
    assert [a["first_step"] for a in none] == [30]


def test_two_engines_agree_on_the_inferred_warmup(writer, run_name):
    """Batches alternate between two engines (two service processes): the second learns the
    warmup from the state the first wrote."""
    engines = [RuleEngine(writer), RuleEngine(writer)]
    lr = lambda s: 1e-3 * min(1.0, (s + 1) / 41) * (1 - 1e-4 * max(0, s - 40))  # noqa: E731
    steps = list(range(0, 200, 2))
    loss = [3.0 - 0.002 * s + 0.01 * ((s * 7919) % 13 - 6) / 6 for s in steps]
    loss[steps.index(90)] = 6.0  # a spike after warmup: exactly one alert
    loss[steps.index(24)] = 6.0  # one during warmup: none
    for i in range(0, len(steps), 10):
        f = Feeder(writer, engines[(i // 10) % 2], run_name)
        f.seq = i
        part = steps[i : i + 10]
        f.send(S("loss", part, loss[i : i + 10]), S("lr", part, [lr(s) for s in part], group="0"))
    fired = [a["first_step"] for a in alerts(writer, run_name) if a["rule"] == "loss-spike"]
    assert fired == [90]
