"""The batch-wide shortcuts of the rule engine agree with point-by-point evaluation."""

from __future__ import annotations

import copy
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from logitwatch.service.rules.conditions import (
    RunContext,
    batch_bounds,
    evaluate,
    fast_path,
    quiet,
)
from logitwatch.service.rules.model import parse_rules


def cond(**c):
    return parse_rules([{"name": "r", "metric": "m", "condition": c}])[0].condition


values = st.lists(
    st.one_of(
        st.floats(-50, 50),
        st.sampled_from([math.nan, math.inf, -math.inf, 20.0, -20.0]),
    ),
    min_size=1,
    max_size=80,
)
threshold = st.builds(
    lambda op, v, a: cond(kind="threshold", op=op, value=v, abs=a),
    st.sampled_from([">", ">=", "<", "<="]),
    st.sampled_from([-20.0, 0.0, 20.0, 49.0]),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(values, min_size=1, max_size=4), threshold)
def test_a_quiet_threshold_has_no_active_point(batch, c):
    ctx = RunContext()
    for vals, b in zip(batch, batch_bounds([np.array(v) for v in batch]), strict=True):
        fired = any(evaluate(c, {}, i, v, ctx).active for i, v in enumerate(vals))
        if quiet(c, b, ctx):
            assert not fired
        nf = any(evaluate(cond(kind="nonfinite"), {}, 0, v, ctx).active for v in vals)
        assert quiet(cond(kind="nonfinite"), b, ctx) == (not nf)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.1, 39.0), min_size=1, max_size=200),
    st.lists(st.floats(0.1, 39.0), max_size=60),
    st.sampled_from([2.0, 0.5]),
)
def test_growth_window_in_one_go_equals_point_by_point(new, old, ratio):
    """A rise below 2 x min_value (a drop from below min_value) cannot fire; the window must
    end as the per-point deque would."""
    c = cond(kind="growth", ratio=ratio, over_steps=50, min_value=20.0)
    if ratio < 1:
        new, old = [v / 2 for v in new], [v / 2 for v in old]
    ctx = RunContext(warmup_steps=5, warmup_declared=True)  # after warmup: nothing to settle
    slow: dict = {}
    for i, v in enumerate(old):
        evaluate(c, slow, i, v, ctx)
    fast = copy.deepcopy(slow)
    start = len(old) + 3
    steps = np.arange(start, start + len(new), dtype=np.int64)
    for s, v in zip(steps.tolist(), new, strict=True):
        verdict = evaluate(c, slow, s, v, ctx)
        assert verdict is None or not verdict.active
    vals = np.array(new)
    (b,) = batch_bounds([vals])
    assert fast_path(c, fast, steps, vals, ctx, b)
    assert fast == slow


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.1, 39.0), min_size=1, max_size=80), st.sampled_from([2.0, 0.5]))
def test_a_growth_series_still_settling_is_never_skipped(vals, ratio):
    """Without warmup the point that settles a series must be found: no fast path before."""
    c = cond(kind="growth", ratio=ratio, over_steps=50, min_value=20.0)
    state: dict = {}
    steps = np.arange(len(vals), dtype=np.int64)
    (b,) = batch_bounds([np.array(vals)])
    assert not fast_path(c, state, steps, np.array(vals), RunContext(), b)
    assert state == {}
