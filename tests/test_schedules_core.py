"""The closed-form LR formulas the trainer and the rule engine share."""

import doctest
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import logitwatch.schedules as schedules
from logitwatch.schedules import ScheduleConfig, lr_at, restart_steps


def test_doctests():
    assert doctest.testmod(schedules).failed == 0


def test_warmup_is_linear_and_reaches_peak():
    cfg = ScheduleConfig(kind="cosine", peak_lr=1.0, warmup_steps=4, total_steps=20)
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_hits_half_way_and_floor():
    cfg = ScheduleConfig(peak_lr=2.0, warmup_steps=10, total_steps=110, min_ratio=0.1)
    floor = 0.2
    assert lr_at(cfg, 10) == pytest.approx(2.0)
    # Half way through the decay the cosine is at the mean of peak and floor.
    assert lr_at(cfg, 60) == pytest.approx((2.0 + floor) / 2)
    assert lr_at(cfg, 35) == pytest.approx(
        floor + (2.0 - floor) * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert lr_at(cfg, 110) == pytest.approx(floor)
    assert lr_at(cfg, 10_000) == pytest.approx(floor)


def test_constant_with_and_without_warmup():
    assert lr_at(ScheduleConfig(kind="constant", peak_lr=0.5), 0) == 0.5
    cfg = ScheduleConfig(kind="constant", peak_lr=0.5, warmup_steps=2)
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.5, 0.5]


def test_sgdr_restarts_with_period_multiplier():
    cfg = ScheduleConfig(kind="sgdr", peak_lr=1.0, warmup_steps=5, t0=10, t_mult=2, min_ratio=0.0)
    # Periods after warmup: [5, 15), [15, 35), [35, 75), ...
    assert restart_steps(cfg, 80) == [15, 35, 75]
    for start, period in ((5, 10), (15, 20), (35, 40)):
        assert lr_at(cfg, start) == pytest.approx(1.0)
        assert lr_at(cfg, start + period // 2) == pytest.approx(0.5)
        last = 0.5 * (1 + math.cos(math.pi * (period - 1) / period))
        assert lr_at(cfg, start + period - 1) == pytest.approx(last)


def test_sgdr_equal_periods():
    cfg = ScheduleConfig(kind="sgdr", peak_lr=1.0, t0=4, t_mult=1, min_ratio=0.5)
    assert restart_steps(cfg, 12) == [4, 8, 12]
    assert [lr_at(cfg, s) for s in (0, 4, 8)] == [1.0, 1.0, 1.0]
    assert lr_at(cfg, 2) == pytest.approx(0.75)


def test_no_restarts_outside_sgdr():
    assert restart_steps(ScheduleConfig(kind="cosine"), 10_000) == []


@given(
    kind=st.sampled_from(["cosine", "sgdr", "constant"]),
    warmup=st.integers(0, 50),
    extra=st.integers(1, 500),
    ratio=st.floats(0, 1),
    t0=st.integers(1, 50),
    t_mult=st.integers(1, 3),
    step=st.integers(0, 2000),
)
def test_lr_stays_between_floor_and_peak(kind, warmup, extra, ratio, t0, t_mult, step):
    cfg = ScheduleConfig(kind, 1e-3, warmup, warmup + extra, ratio, t0, t_mult)
    lr = lr_at(cfg, step)
    assert 0 <= lr <= 1e-3 * (1 + 1e-12)
    if step < warmup or ratio > 0:
        assert lr > 0  # zero only on a floor of zero, where a decay ends
    if step >= warmup:
        assert lr >= ratio * 1e-3 * (1 - 1e-12)


def test_round_trip_dict():
    cfg = ScheduleConfig(kind="sgdr", peak_lr=0.01, warmup_steps=3, t0=7, t_mult=2)
    assert ScheduleConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "linear"}, "schedule.kind"),
        ({"peak_lr": 0}, "schedule.peak_lr"),
        ({"peak_lr": float("nan")}, "schedule.peak_lr"),
        ({"warmup_steps": -1}, "schedule.warmup_steps"),
        ({"total_steps": 0}, "schedule.total_steps"),
        ({"min_ratio": 1.5}, "schedule.min_ratio"),
        ({"t0": 0}, "schedule.t0"),
        ({"t_mult": 1.5}, "schedule.t_mult"),
        ({"warmup_steps": 20, "total_steps": 10}, "schedule.warmup_steps"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ScheduleConfig(**kwargs)


def test_unknown_key_named():
    with pytest.raises(ValueError, match=r"schedule\.warmup "):
        ScheduleConfig.from_dict({"warmup": 3})


def test_negative_step_rejected():
    with pytest.raises(ValueError, match="step"):
        lr_at(ScheduleConfig(), -1)
