"""Shortcuts of conditions.fast_path for spike and schedule rules: a run of points none of
which holds leaves exactly the state the point-by-point evaluation leaves; one that holds
leaves the state untouched for the point-by-point path."""

from __future__ import annotations

import copy
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from logitwatch.schedules import ScheduleConfig, lr_at
from logitwatch.service.rules.conditions import RunContext, _schedule, _spike, fast_path
from logitwatch.service.rules.model import parse_rules


def cond(**c):
    return parse_rules([{"name": "r", "metric": "m", "condition": c}])[0].condition


spikes = st.builds(
    lambda kind, window, sigmas, points, rel, direction: cond(
        kind=kind, window=window, sigmas=sigmas, min_points=min(points, window),
        min_rel=rel, direction=direction,
    ),
    st.sampled_from(["mad", "zscore"]),
    st.sampled_from([5, 12, 30, 200]),
    st.sampled_from([3.0, 6.0]),
    st.sampled_from([3, 10]),
    st.sampled_from([0.0, 0.05, 0.15, 1.5]),
    st.sampled_from(["up", "down", "both"]),
)  # fmt: skip
level = st.floats(0.5, 3.0)
noise = st.floats(-0.2, 0.2)
odd = st.sampled_from([math.nan, math.inf, 8.0, 0.01, -5.0])


@st.composite
def runs(draw):
    c = draw(spikes)
    base = draw(level)
    old = [base + x for x in draw(st.lists(noise, max_size=60))]
    new = [draw(odd) if draw(st.integers(0, 20)) == 0 else base + draw(noise)
           for _ in range(draw(st.integers(1, 40)))]  # fmt: skip
    return c, old, new


@settings(max_examples=500, deadline=None)
@given(runs())
def test_quiet_spikes_move_the_window_as_spike_does(case):
    c, old, new = case
    state = {"w": list(old)} if old else {}
    want = copy.deepcopy(state)
    held = False
    for v in new:
        if math.isfinite(v):
            verdict = _spike(c, want, v)
            held |= verdict is not None and verdict.active
    before = copy.deepcopy(state)
    done = fast_path(c, state, np.arange(len(new)), np.array(new), RunContext())
    assert done == (not held)
    assert state == (before if held else want)


def test_a_window_longer_than_the_rule_keeps_its_last_points():
    c = cond(kind="mad", window=5, min_points=3)
    state = {"w": [1.0] * 12}
    want = copy.deepcopy(state)
    _spike(c, want, 1.0)
    assert fast_path(c, state, np.arange(1), np.array([1.0]), RunContext())
    assert state == want and len(state["w"]) == 5


def test_a_window_of_another_kind_goes_point_by_point():
    c = cond(kind="mad", window=20)
    state = {"w": [[1, 2.0]] * 12}
    assert not fast_path(c, state, np.arange(1), np.array([1.0]), RunContext())
    assert state == {"w": [[1, 2.0]] * 12}


schedules = st.sampled_from([
    ScheduleConfig(kind="cosine", peak_lr=1e-3, warmup_steps=10, total_steps=200),
    ScheduleConfig(kind="sgdr", peak_lr=3e-4, warmup_steps=5, t0=20, t_mult=2),
    ScheduleConfig(kind="constant", peak_lr=1e-2, warmup_steps=0),
])  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    schedules,
    st.integers(0, 300),
    st.lists(st.sampled_from([1.0, 1.0, 1.0, 1.05, 0.93, 1.3, 0.5, math.nan]), min_size=1,
             max_size=30),
    st.sampled_from([0.1, 0.25]),
)  # fmt: skip
def test_a_run_of_lrs_on_schedule_is_settled_at_once(cfg, start, factors, tolerance):
    c = cond(kind="schedule", tolerance=tolerance)
    ctx = RunContext(schedule=cfg)
    steps = list(range(start, start + len(factors)))
    values = [f * lr_at(cfg, s) for s, f in zip(steps, factors, strict=True)]
    off = any(
        (v := _schedule(c, s, x, ctx)) is not None and v.active
        for s, x in zip(steps, values, strict=True)
        if math.isfinite(x)
    )
    state: dict = {}
    assert fast_path(c, state, np.array(steps), np.array(values), ctx) == (not off)
    assert state == {}


def test_a_zero_lr_in_the_schedule_goes_point_by_point():
    c = cond(kind="schedule", tolerance=0.1)
    ctx = RunContext(schedule=ScheduleConfig(kind="cosine", peak_lr=1e-3, min_ratio=0.0,
                                             total_steps=100))  # fmt: skip
    assert not fast_path(c, {}, np.array([100, 101]), np.array([0.0, 0.0]), ctx)
    assert fast_path(c, {}, np.array([10]), np.array([math.nan]), ctx)
