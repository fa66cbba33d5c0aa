"""The rule engine over a real database (SQLite and PostgreSQL): lifecycle, state, concurrency."""

from __future__ import annotations

import math
import threading
from datetime import timedelta

import pytest
from helpers.feed import Feeder, S, alerts
from sqlalchemy import select

from logitwatch.service.rules import absence
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.rules.model import parse_rules
from logitwatch.service.rules.user import put_user_rules
from logitwatch.service.store.db import WRITE, make_engine, make_sessionmaker
from logitwatch.service.store.models import Run, utcnow


@pytest.fixture
def writer(db_url):
    engine = make_engine(db_url)
    yield make_sessionmaker(engine.execution_options(**{WRITE: True}))
    engine.dispose()


def test_attention_logit_level_lifecycle_and_resolution(writer, run_name):
    with writer() as s:  # the level rules alone (the runaway rule is tested below)
        off = [{"name": "attn-logit-runaway", "metric": "x", "condition": {"kind": "nonfinite"},
                "enabled": False}]  # fmt: skip
        put_user_rules(s, rules=parse_rules(off))
        s.commit()
    f = Feeder(writer, RuleEngine(writer), run_name)
    # attn-logit-high needs 2 steps above 100: pending first, then firing.
    assert f.send(S("attn.logit_max", [10, 20], [90.0, 150.0], layer="0", head="1")) == []
    (pending,) = alerts(writer, run_name)
    assert pending["state"] == "pending" and pending["rule"] == "attn-logit-high"
    firing = f.send(S("attn.logit_max", [30], [160.0], layer="0", head="1"))
    assert [a["rule"] for a in firing] == ["attn-logit-high"]
    a = firing[0]
    assert a["labels"] == {"layer": "0", "head": "1"} and a["metric"] == "attn.logit_max"
    assert (a["first_step"], a["last_step"], a["value"], a["threshold"]) == (20, 30, 160.0, 100.0)
    assert "QK-norm" in a["hint"] and a["severity"] == "warning" and a["id"] == pending["id"]
    # Above 1000: critical at once, a second alert of another rule on the same series.
    rules = {a["rule"] for a in f.send(S("attn.logit_max", [40], [2000.0], layer="0", head="1"))}
    assert rules == {"attn-logit-high", "attn-logit-critical"}
    # Clear, but held for 20 steps after the last step the condition held (40).
    assert len(f.send(S("attn.logit_max", [50], [3.0], layer="0", head="1"))) == 2
    assert f.send(S("attn.logit_max", [60], [3.0], layer="0", head="1")) == []
    states = {a["rule"]: a for a in alerts(writer, run_name)}
    assert states["attn-logit-high"]["state"] == "resolved"
    assert states["attn-logit-high"]["resolved_step"] == 60
    assert states["attn-logit-high"]["fired_step"] == 30
    # A new episode opens a new alert; a pending that clears is forgotten.
    f.send(S("attn.logit_max", [70], [500.0], layer="0", head="1"))
    f.send(S("attn.logit_max", [80], [5.0], layer="0", head="1"))
    assert len(alerts(writer, run_name)) == 2
    with writer() as s:
        put_user_rules(s, rules=[])
        s.commit()


def test_hysteresis_one_alert_an_episode_hold_and_resolve_margin(writer, run_name):
    """A value hovering around its threshold fires once and resolves once: within 10 % under
    the threshold it keeps firing, and it resolves only 20 steps after it last held."""
    f = Feeder(writer, RuleEngine(writer), run_name)
    hover = [150.0, 150.0, 95.0, 120.0, 85.0, 110.0, 92.0, 130.0, 80.0, 101.0]  # steps 0-90
    f.send(S("attn.logit_max", list(range(0, 100, 10)), hover, layer="0", head="0"))
    (a,) = alerts(writer, run_name)
    assert (a["state"], a["first_step"], a["fired_step"], a["last_step"]) == ("firing", 0, 10, 90)
    # 80 at step 100: clear by the margin, but within 20 steps of 90; 80 at 110 resolves it
    f.send(S("attn.logit_max", [100], [80.0], layer="0", head="0"))
    assert alerts(writer, run_name)[0]["state"] == "firing"
    f.send(S("attn.logit_max", [110], [80.0], layer="0", head="0"))
    (a,) = alerts(writer, run_name)
    assert (a["state"], a["resolved_step"]) == ("resolved", 110)
    # a user rule without hysteresis resolves at the first clear point, every time
    loud = parse_rules(
        [{"name": "loud", "metric": "x", "condition": {"kind": "threshold", "value": 1}}]
    )
    with writer() as s:
        put_user_rules(s, rules=loud)
        s.commit()
    f.send(S("x", list(range(8)), [2.0, 0.5] * 4))
    loud = [a for a in alerts(writer, run_name) if a["rule"] == "loud"]
    assert len(loud) == 4 and all(a["state"] == "resolved" for a in loud)


def test_nonfinite_is_critical_at_once_and_json_safe(writer, run_name):
    f = Feeder(writer, RuleEngine(writer), run_name)
    (a,) = f.send(S("loss", [1, 2], [2.0, math.nan]))
    assert (a["rule"], a["severity"], a["value"], a["first_step"]) == (
        "nonfinite",
        "critical",
        "NaN",
        2,
    )
    fired = f.send(S("grad.norm", [3], [math.inf]))  # a second metric: its own alert
    assert [(b["metric"], b["value"]) for b in fired] == [
        ("loss", "NaN"),
        ("grad.norm", "Infinity"),
    ]


def test_late_and_replayed_points_are_ignored_and_state_survives_a_restart(writer, run_name):
    rule = parse_rules(
        [
            {
                "name": "big",
                "metric": "x",
                "condition": {"kind": "threshold", "value": 10},
                "for_steps": 3,
            }
        ]
    )
    with writer() as s:
        put_user_rules(s, rules=rule)
        s.commit()
    f = Feeder(writer, RuleEngine(writer, builtins=False), run_name)
    f.send(S("x", [1, 2], [11.0, 12.0]))
    # Late points (steps <= last seen) count for nothing, even if they would break the streak.
    f.send(S("x", [0, 1, 2], [0.0, 0.0, 0.0]))
    # A new engine object (a restarted process) continues the streak from the database.
    f.engine = RuleEngine(writer, builtins=False)
    (a,) = f.send(S("x", [3], [13.0]))
    assert (a["state"], a["first_step"], a["last_step"]) == ("firing", 1, 3)
    with writer() as s:  # the PostgreSQL database is shared by the test session
        put_user_rules(s, rules=[])
        s.commit()


def test_two_engines_on_one_database_fire_once(db_url, writer, run_name):
    other_engine = make_engine(db_url)
    other = make_sessionmaker(other_engine.execution_options(**{WRITE: True}))
    feeders = [
        Feeder(writer, RuleEngine(writer), run_name),
        Feeder(other, RuleEngine(other), run_name),
    ]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for k in range(8):
                step = 2 * k + i
                value = 5.0 if step < 6 else 5000.0
                feeders[i].send(S("attn.logit_max", [step], [value], layer="0", head="0"), seq=step)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other_engine.dispose()
    assert not errors, errors
    got = [a for a in alerts(writer, run_name) if a["rule"] == "attn-logit-critical"]
    assert len(got) == 1 and got[0]["state"] == "firing"


def test_new_segment_resets_steps(writer, run_name):
    f = Feeder(writer, RuleEngine(writer), run_name)
    f.send(S("loss", list(range(0, 100)), [2.0] * 100))
    # A resume at step 50 in segment 1: points are evaluated again, not dropped as late.
    (a,) = f.send(S("loss", [50], [math.nan]), segment=1)
    assert a["rule"] == "nonfinite" and a["segment"] == 1


def spiky_loss(n, spikes=(), start=0):
    vals = [3.0 - 0.001 * i + 0.01 * ((i * 7919) % 13 - 6) / 6 for i in range(n)]
    for s in spikes:
        vals[s] = 6.0
    return list(range(start, start + n)), vals


def test_loss_spike_fires_and_resolves_sgdr_restart_is_muted(writer, run_name):
    f = Feeder(writer, RuleEngine(writer), run_name)
    f.config({"schedule": {"kind": "sgdr", "peak_lr": 1e-3, "warmup_steps": 10, "t0": 100}})
    steps, vals = spiky_loss(300, spikes=[80])
    vals[110] = vals[111] = 6.0  # right after the scheduled restart at step 110: muted
    f.send(S("loss", steps, vals))
    got = [a for a in alerts(writer, run_name) if a["rule"] == "loss-spike"]
    assert [(a["first_step"], a["state"], a["resolved_step"]) for a in got] == [
        (80, "resolved", 90)  # held 10 steps after the spike
    ]


def test_grad_spike_before_loss_spike_is_raised_as_such(writer, run_name):
    f = Feeder(writer, RuleEngine(writer), run_name)
    steps, loss = spiky_loss(200, spikes=[150])
    _, grad = spiky_loss(200, spikes=[50, 145])
    grad = [g / 3 if g < 5 else 10.0 for g in grad]  # ~1 with x10 spikes, as after a bad batch
    f.send(S("loss", steps, loss), S("grad.norm", steps, grad))
    rules = sorted((a["rule"], a["first_step"]) for a in alerts(writer, run_name))
    assert ("grad-spike-then-loss-spike", 150) in rules
    assert ("grad-norm-spike", 50) in rules and ("grad-norm-spike", 145) in rules
    # A grad spike alone (step 50) or together with the loss (a bad batch) is not 'then'.
    steps2, both = spiky_loss(100, spikes=[60], start=200)
    f.send(
        S("loss", steps2, both), S("grad.norm", steps2, [b / 3 if b < 5 else 10.0 for b in both])
    )
    then = [a for a in alerts(writer, run_name) if a["rule"] == "grad-spike-then-loss-spike"]
    assert len(then) == 1


def test_lr_off_schedule_and_update_ratio_jump(writer, run_name):
    f = Feeder(writer, RuleEngine(writer), run_name)
    cfg = {"kind": "cosine", "peak_lr": 1e-3, "warmup_steps": 10, "total_steps": 1000}
    f.config({"schedule": cfg})
    from logitwatch.schedules import ScheduleConfig, lr_at

    sc = ScheduleConfig.from_dict(cfg)
    steps = list(range(0, 200))
    good = [lr_at(sc, s + 1) for s in steps]  # reported one step late: within the slack
    assert f.send(S("lr", steps, good, group="0")) == []
    steps = list(range(200, 210))
    bad = [10 * lr_at(sc, s) for s in steps]  # a resume with the LR ten times too high
    ratio = [1e-3] * 5 + [1e-2] * 5
    fired = f.send(S("lr", steps, bad, group="0"), S("update.ratio", steps, ratio))
    by_rule = {a["rule"]: a for a in fired}
    assert by_rule["lr-off-schedule"]["first_step"] == 200
    assert by_rule["lr-off-schedule"]["labels"] == {"group": "0"}
    assert by_rule["update-ratio-jump"]["first_step"] == 205


def test_run_silent_fires_after_the_configured_time_and_resolves_on_data(writer, run_name):
    engine = RuleEngine(writer)
    f = Feeder(writer, engine, run_name)
    f.send(S("loss", [1, 2, 3], [1.0, 1.0, 1.0]))
    assert engine.check_absent(now=utcnow() + timedelta(seconds=60)) == 0
    later = utcnow() + timedelta(seconds=601)
    assert engine.check_absent(now=later) >= 1
    assert engine.check_absent(now=later) == 0  # already open: not twice
    (a,) = alerts(writer, run_name)
    assert (a["rule"], a["last_step"], a["threshold"]) == ("run-silent", 3, 600.0)
    f.send(S("loss", [4], [1.0]))
    (a,) = alerts(writer, run_name)
    assert a["state"] == "resolved"


def test_the_absent_check_writes_only_the_runs_it_may_change(writer, run_name, monkeypatch):
    """A read picks the runs whose absent alerts may change; only those are read again and
    written: none while the run reports, then the silent run, then its open alert (resolved
    past the horizon)."""
    checked: list[int] = []
    check = absence._check

    def spy(engine, sm, run_ids, now):
        checked.extend(run_ids)
        return check(engine, sm, run_ids, now)

    monkeypatch.setattr(absence, "_check", spy)
    engine = RuleEngine(writer, absent_horizon_s=3600.0)
    f = Feeder(writer, engine, run_name)
    f.send(S("loss", [1, 2, 3], [1.0] * 3))
    with writer() as s:
        run_id = s.scalar(select(Run.id).where(Run.name == run_name))
    engine.check_absent(now=utcnow() + timedelta(seconds=60))
    assert run_id not in checked and alerts(writer, run_name) == []
    engine.check_absent(now=utcnow() + timedelta(seconds=601))
    assert run_id in checked
    assert [a["state"] for a in alerts(writer, run_name)] == ["firing"]
    checked.clear()
    engine.check_absent(now=utcnow() + timedelta(seconds=3700))
    assert run_id in checked
    assert [a["state"] for a in alerts(writer, run_name)] == ["resolved"]


def test_a_run_that_reached_its_declared_steps_is_finished_not_silent(writer, run_name):
    engine = RuleEngine(writer)
    f = Feeder(writer, engine, run_name)
    f.config({"train": {"steps": 4}})
    f.send(S("loss", [0, 1, 2, 3], [1.0] * 4))
    engine.check_absent(now=utcnow() + timedelta(seconds=601))
    assert alerts(writer, run_name) == []


@pytest.mark.parametrize(("last", "silent"), [(145, False), (140, True)])
def test_a_run_reporting_every_n_steps_is_finished_at_its_last_report(
    writer, run_name, last, silent
):
    """150 steps reported every 5: the last report is step 145, and the run is done there."""
    engine = RuleEngine(writer)
    f = Feeder(writer, engine, run_name)
    f.config({"train": {"steps": 150, "every": 5}})
    f.send(S("loss", list(range(0, last + 1, 5)), [1.0] * (last // 5 + 1)))
    engine.check_absent(now=utcnow() + timedelta(seconds=601))
    assert [a["rule"] for a in alerts(writer, run_name)] == (["run-silent"] if silent else [])


def test_attention_runaway_fires_in_warmup_from_a_floor_and_not_on_a_steady_high_logit(
    writer, run_name
):
    """The runaway rule counts from the first step (warmup included): |x| >= 50 and doubled
    within 50 steps. Early growth from ~0 to 40 is training; a steady 60 is a level, not a
    runaway; 0.1 -> 55 in 20 steps is."""
    with writer() as s:  # the built-ins as shipped (user rules live in the shared database)
        put_user_rules(s, rules=[])
        s.commit()
    f = Feeder(writer, RuleEngine(writer), run_name)
    f.config({"schedule": {"kind": "cosine", "peak_lr": 1e-3, "warmup_steps": 100,
                           "total_steps": 1000}})  # fmt: skip
    early = [0.1, 5.0, 20.0, 40.0, 45.0, 44.0]  # steps 0-25: under 50
    f.send(S("attn.logit_max", list(range(0, 30, 5)), early, layer="0", head="0"))
    f.send(S("attn.logit_max", list(range(0, 300, 5)), [60.0] * 60, layer="1", head="0"))
    assert [a["rule"] for a in alerts(writer, run_name)] == []
    fired = f.send(S("attn.logit_max", [30, 35], [55.0, 90.0], layer="0", head="0"))
    assert [(a["rule"], a["fired_step"]) for a in fired] == [("attn-logit-runaway", 30)]
