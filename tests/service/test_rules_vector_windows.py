"""GrowthWindows.one and .many against conditions._growth point by point: an entry moves
exactly as the per-series state dict would, settling included, and only when no verdict on
its points is active; an entry with an active verdict is left as it was."""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from logitwatch.service.rules.conditions import RunContext, _growth
from logitwatch.service.rules.model import parse_rules
from logitwatch.service.rules.windows import GrowthWindows

NO_WARMUP = RunContext(warmup_steps=0, warmup_declared=True)
WARM = RunContext(warmup_steps=1, warmup_declared=True)


def cond(**c):
    return parse_rules([{"name": "r", "metric": "m", "condition": c}])[0].condition


conditions = st.builds(
    lambda ratio, over, floor, settle: cond(
        kind="growth", ratio=ratio, over_steps=over, min_value=floor, settle=settle
    ),
    st.sampled_from([2.0, 1.5, 4.0, 0.5, 0.25]),
    st.sampled_from([1, 3, 10, 25]),
    st.sampled_from([0.0, 0.4, 5.0, 20.0]),
    st.booleans(),
)
# Values that hover, settle, double and collapse: verdicts of every kind.
values = st.floats(0.0, 60.0) | st.sampled_from([0.0, 5.0, 10.0, 20.0, 40.0, 41.0])


def _history(draw_history, c, ctx):
    """Entry states made by feeding some points through _growth."""
    dicts = []
    for pts in draw_history:
        d: dict = {}
        for s, v in pts:
            _growth(c, d, s, v, ctx)
        dicts.append(d)
    return dicts


def _expect(c, d, points, ctx):
    """(any verdict active, the dict after) for points fed one by one."""
    d = copy.deepcopy(d)
    held = False
    for s, v in points:
        verdict = _growth(c, d, s, v, ctx)
        held |= verdict is not None and verdict.active
    return held, d


def _block(dicts, last):
    b = GrowthWindows()
    keys = [f"m{{i={i}}}" for i in range(len(dicts))]
    pos = b.slots(keys, np.arange(len(keys)), 0, None)
    for i, d in enumerate(dicts):
        if d:
            assert b.put(int(pos[i]), copy.deepcopy(d), 0, last[i])
    b.dirty = False
    return b, pos


@st.composite
def cases(draw):
    c = draw(conditions)
    ctx = draw(st.sampled_from([NO_WARMUP, WARM]))
    n = draw(st.integers(1, 6))
    history, batches = [], []
    for _ in range(n):
        old = draw(st.lists(values, max_size=40))
        gap = draw(st.integers(1, 3))
        hist = [(t * gap, v) for t, v in enumerate(old)]
        start = (hist[-1][0] if hist else -1) + draw(st.integers(1, 30))
        new = draw(st.lists(values, min_size=1, max_size=60))
        steps = np.cumsum([start, *draw(st.lists(st.integers(1, 4), min_size=len(new) - 1,
                                                  max_size=len(new) - 1))])  # fmt: skip
        history.append(hist)
        batches.append([(int(s), v) for s, v in zip(steps, new, strict=True)])
    return c, ctx, history, batches


@settings(max_examples=400, deadline=None)
@given(cases())
def test_many_points_per_entry_move_as_growth_does_or_not_at_all(case):
    c, ctx, history, batches = case
    dicts = _history(history, c, ctx)
    last = [h[-1][0] if h else -1 for h in history]
    b, pos = _block(dicts, last)
    k = np.array([len(p) for p in batches])
    steps = np.array([s for p in batches for s, _ in p], dtype=np.int64)
    v = np.array([x for p in batches for _, x in p])
    ends = np.array([p[-1][0] for p in batches], dtype=np.int64)
    settle = c.settle and ctx.warmup_steps == 0
    ok = b.many(c, pos, k, steps, v, settle, 0, ends + 1)
    for i, d in enumerate(dicts):
        held, want = _expect(c, d, batches[i], ctx)
        assert ok[i] == (not held)
        got = b.take(int(pos[i]))
        assert got == (d if held else want)
        if not held:
            assert b.last[pos[i]] == ends[i] + 1 and b.seg[pos[i]] == 0


@settings(max_examples=400, deadline=None)
@given(cases())
def test_one_point_per_entry_moves_as_growth_does_or_not_at_all(case):
    c, ctx, history, batches = case
    dicts = _history(history, c, ctx)
    last = [h[-1][0] if h else -1 for h in history]
    b, pos = _block(dicts, last)
    steps = np.array([p[0][0] for p in batches], dtype=np.int64)
    v = np.array([p[0][1] for p in batches])
    settle = c.settle and ctx.warmup_steps == 0
    ok = b.one(c, pos, steps, v, settle, 0)
    for i, d in enumerate(dicts):
        held, want = _expect(c, d, batches[i][:1], ctx)
        assert ok[i] == (not held)
        assert b.take(int(pos[i])) == (d if held else want)


def test_many_lays_out_wide_entries_a_few_at_a_time():
    """Entries wider than one layout allows are judged in turns, with the same result."""
    c = cond(kind="growth", ratio=0.5, over_steps=5000, min_value=0.0)
    rng = np.random.default_rng(1)
    n, k = 40, 4000  # 160,000 cells: more than one layout
    dicts = [{} for _ in range(n)]
    for d in dicts:  # falling values: a drop's window keeps every point
        for s in range(300):
            _growth(c, d, s, 100.0 - s * 0.01, WARM)
    b, pos = _block(dicts, [299] * n)
    steps = np.tile(np.arange(300, 300 + k), n)
    v = np.tile(97.0 - np.arange(k) * 1e-4, n) + rng.uniform(0, 1e-5, n * k)
    ok = b.many(c, pos, np.full(n, k), steps, v, False, 0, np.full(n, 300 + k - 1))
    assert ok.all()
    for i, d in enumerate(dicts):
        _, want = _expect(c, d, list(zip(steps[i * k : (i + 1) * k].tolist(),
                                         v[i * k : (i + 1) * k].tolist(), strict=True)), WARM)  # fmt: skip
        assert b.take(int(pos[i])) == want


def test_touch_stamps_only_entries_that_hold_something():
    b = GrowthWindows()
    pos = b.slots(["a{}", "b{}"], np.arange(2), 0, None)
    assert b.put(int(pos[0]), {"ws": [1], "w": [2.0]}, 0, 1)
    b.dirty = False
    b.touch(pos, 0, np.array([7, 8]))
    assert b.dirty and b.last.tolist() == [7, -1]
