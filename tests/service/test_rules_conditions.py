"""Conditions point by point (pure): robust spikes, growth and drops, slopes, schedules, config."""

from __future__ import annotations

import json
import math
import random

import numpy as np

from logitwatch.schedules import ScheduleConfig, lr_at
from logitwatch.service.rules.conditions import RunContext, evaluate
from logitwatch.service.rules.model import parse_rules


def cond(**c):
    return parse_rules([{"name": "r", "metric": "m", "condition": c}])[0].condition


def run(c, values, ctx=None, steps=None):
    state: dict = {}
    ctx = ctx or RunContext()
    out = [
        evaluate(c, state, s, v, ctx)
        for s, v in zip(steps or range(len(values)), values, strict=True)
    ]
    json.dumps(state, allow_nan=False)  # the state stays strict JSON whatever came in
    return out, state


def test_mad_spike_ignores_heavy_tails_and_catches_a_real_spike():
    rng = random.Random(0)
    # Laplace noise has heavy tails (a 6-sigma excursion every ~1000 points); the median/MAD
    # window stays nearly quiet on it and still sees a 10x jump.
    noise = [2.0 + rng.choice((-1, 1)) * rng.expovariate(20) for _ in range(1000)]
    verdicts, _ = run(cond(kind="mad", window=200, sigmas=6), noise)
    false_alarms = sum(1 for v in verdicts if v and v.active)
    assert false_alarms <= 5
    verdicts, _ = run(cond(kind="mad", window=200, sigmas=6), [*noise[:300], 20.0, *noise[300:400]])
    assert verdicts[300].active and verdicts[300].threshold < 3
    assert not any(v.active for v in verdicts[301:])  # the spike did not widen the window


def test_zscore_is_winsorised():
    vals = [1.0, 1.1, 0.9] * 10 + [50.0, 1.0, 60.0]
    verdicts, _ = run(cond(kind="zscore", window=100, sigmas=6), vals)
    assert verdicts[30].active and not verdicts[31].active and verdicts[32].active


#: A run whose warmup is known and over (the settle wait is for runs without warmup).
WARM = RunContext(warmup_steps=10, warmup_declared=True)


def test_growth_rise_and_drop():
    rise = cond(kind="growth", ratio=2, over_steps=50, min_value=20)
    verdicts, _ = run(rise, [5.0, 8.0, 12.0, 39.0], WARM, steps=[0, 10, 20, 30])
    assert not any(v and v.active for v in verdicts)  # x8, but from below the floor of 20
    verdicts, _ = run(rise, [1.0, 40.0], WARM, steps=[0, 10])
    assert verdicts[1].active and verdicts[1].threshold == 40.0  # 2 x the floor, not 2 x 1
    verdicts, _ = run(rise, [30.0, 45.0, 61.0, 70.0], WARM, steps=[0, 10, 20, 200])
    assert [bool(v and v.active) for v in verdicts] == [False, False, True, False]
    drop = cond(kind="growth", ratio=0.5, over_steps=50, min_value=0.2)
    verdicts, _ = run(drop, [0.9, 0.8, 0.4, 0.1], WARM, steps=[0, 10, 20, 30])
    assert [bool(v and v.active) for v in verdicts] == [False, False, True, True]
    verdicts, _ = run(drop, [0.19, 0.05], WARM, steps=[0, 10])
    assert not verdicts[1].active  # from a baseline below min_value


def test_growth_uses_the_magnitude_whatever_the_sign():
    rise = cond(kind="growth", ratio=2, over_steps=50, min_value=20)
    pos, _ = run(rise, [21.0, 30.0, 45.0], WARM, steps=[0, 10, 20])
    neg, _ = run(rise, [-21.0, -30.0, -45.0], WARM, steps=[0, 10, 20])
    assert [v and (v.active, v.threshold) for v in pos] == [
        v and (v.active, v.threshold) for v in neg
    ]
    assert neg[2].active and neg[2].value == -45.0


def test_growth_waits_for_the_value_to_settle_on_a_run_without_warmup():
    """A tiny model at LR 1e-2 with no warmup: its logits rise from 0.1 to ~45 and stay (the
    shape of a healthy Hugging Face run); only a doubling after that counts."""
    rise = cond(kind="growth", ratio=2, over_steps=50, min_value=20)
    early = [0.1 * 1.2**i for i in range(33)] + [45.0] * 60  # x2 every 4 steps, then flat
    late = [95.0] * 5  # the value doubles after it settled
    steps = list(range(len(early) + len(late)))
    cold, state = run(rise, early + late, RunContext(), steps=steps)
    fired = [s for s, v in zip(steps, cold, strict=True) if v and v.active]
    assert fired == steps[len(early) :]
    assert state["settled"] and "from" not in state
    # the same series after a declared warmup of 10 steps is judged at once (and fires early)
    warm, _ = run(rise, early, RunContext(warmup_steps=10, warmup_declared=True), steps=steps[:93])
    assert any(v and v.active for v in warm[:40])
    # settle: false judges from the first point, whatever the warmup
    eager, _ = run(cond(kind="growth", ratio=2, over_steps=50, min_value=20, settle=False),
                   early, RunContext(), steps=steps[:93])  # fmt: skip
    assert any(v and v.active for v in eager[:40])


def test_settling_needs_a_full_window_and_a_clear_margin():
    drop = cond(kind="growth", ratio=0.5, over_steps=50, min_value=0.4)
    # entropy falling steadily 1.0 -> 0.35 over 100 steps: never "settled", never judged
    falling = [1.0 - 0.0065 * i for i in range(101)]
    verdicts, state = run(drop, falling, RunContext(), steps=list(range(101)))
    assert not any(v and v.active for v in verdicts) and "settled" not in state
    # flat from the start: settled a full window after the first point, not before
    _, state = run(drop, [0.9] * 50, RunContext(), steps=list(range(50)))
    assert "settled" not in state
    _, state = run(drop, [0.9] * 51, RunContext(), steps=list(range(51)))
    assert state["settled"]


def test_slope_of_abs_value():
    falling = [-10.0 - 0.05 * i for i in range(20)]  # |value| rises 0.05 per 10 steps
    steps = list(range(0, 200, 10))
    c = cond(kind="slope", above=0.02, window_steps=100, min_points=5, abs=True)
    verdicts, _ = run(c, falling, steps=steps)
    assert not verdicts[-1].active and math.isclose(verdicts[-1].value, 0.005)
    verdicts, _ = run(cond(kind="slope", above=0.001, abs=True), falling, steps=steps)
    assert verdicts[-1].active
    verdicts, _ = run(cond(kind="slope", above=0.001), falling, steps=steps)
    assert not verdicts[-1].active  # the raw value falls


def test_schedule_deviation_allows_one_step_of_slack():
    cfg = {"kind": "sgdr", "peak_lr": 1e-3, "warmup_steps": 5, "t0": 20}
    ctx = RunContext.from_config({"schedule": cfg})
    sc = ScheduleConfig.from_dict(cfg)
    c = cond(kind="schedule", tolerance=0.1)
    late, _ = run(c, [lr_at(sc, s - 1) if s else lr_at(sc, 0) for s in range(60)], ctx)
    assert not any(v.active for v in late)
    wrong, _ = run(c, [10 * lr_at(sc, s) for s in range(60)], ctx)
    # only the step before each restart passes: 10x the floor is the next step's peak
    assert [s for s, v in enumerate(wrong) if not v.active] == [24, 44]
    assert ctx.restarts(-1, 60) == [25, 45]
    bad = RunContext.from_config({"schedule": {"kind": "linear"}})
    assert bad.schedule is None and "schedule.kind" in bad.schedule_error
    assert run(c, [1.0], bad)[0] == [None]  # no declared schedule: nothing to judge


def test_threshold_relative_to_the_runs_config_and_nonfinite_values():
    c = cond(kind="threshold", op=">", value=0.9, of_config="softcap_final")
    ctx = RunContext.from_config({"model": {"softcap_final": 30.0}})
    verdicts, _ = run(c, [20.0, 28.0], ctx)
    assert [v.active for v in verdicts] == [False, True] and verdicts[1].threshold == 27.0
    assert run(c, [28.0], RunContext())[0] == [None]  # no soft-cap configured
    verdicts, state = run(cond(kind="mad", window=10, min_points=3), [1.0, math.nan, 1.0, math.inf])
    assert verdicts[1] is None and state["w"] == [1.0, 1.0]
    verdicts, _ = run(cond(kind="nonfinite"), [1.0, math.nan, -math.inf])
    assert [v.active for v in verdicts] == [False, True, True]


def test_growth_window_in_one_go_matches_point_by_point():
    from logitwatch.service.rules.conditions import fast_path

    rng = random.Random(1)
    for ctx in (WARM, RunContext()):  # judged at once, or after settling (no warmup)
        for ratio in (2.0, 0.5):
            c = cond(kind="growth", ratio=ratio, over_steps=30, min_value=20 if ratio > 1 else 100)
            vals = [abs(rng.gauss(5, 3)) for _ in range(120)]
            steps = list(range(0, 600, 5))
            one, seq_state = run(c, vals, ctx, steps=steps)
            assert not any(v and v.active for v in one)
            for size in (10, 40):  # small batches go through Python, larger ones through numpy
                state: dict = {}
                quick = 0
                for lo in range(0, 120, size):  # quiet batches are handled in one go ...
                    s_np, v_np = np.array(steps[lo : lo + size]), np.array(vals[lo : lo + size])
                    if fast_path(c, state, s_np, v_np, ctx):
                        quick += 1
                    else:  # ... except while the series is settling: point by point
                        assert not state.get("settled") and ctx is not WARM
                        for st, v in zip(s_np.tolist(), v_np.tolist(), strict=True):
                            evaluate(c, state, st, v, ctx)
                assert state == seq_state and quick >= 120 // size - 2
    # a rise past 2 x min_value is not quiet, and judged against the floored window minimum
    rise = cond(kind="growth", ratio=2.0, over_steps=30, min_value=20)
    state = {"ws": [570, 590], "w": [3.0, 9.0]}
    assert not fast_path(rise, dict(state), np.array([600]), np.array([45.0]), WARM)
    assert fast_path(rise, dict(state), np.array([600]), np.array([39.0]), WARM)
    v = evaluate(rise, state, 600, 45.0, WARM)
    assert v.active and v.threshold == 40.0


def test_mad_spike_on_a_falling_loss():
    # a loss falling from 3.6 to 2.5 with batch noise: the trend must not hide a +1.7 spike
    rng = random.Random(2)
    vals = [3.6 - 1.1 * i / 75 + rng.gauss(0, 0.04) for i in range(75)] + [4.28, 2.5, 2.49]
    verdicts, _ = run(cond(kind="mad", window=200, sigmas=6, min_rel=0.05), vals)
    assert [i for i, v in enumerate(verdicts) if v and v.active] == [75]
