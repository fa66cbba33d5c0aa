"""The LRScheduler wrappers follow the closed-form formulas, restarts and resume included."""

import doctest
import io
import math

import pytest
import torch

import logitwatch.agent.reference.schedule as schedule_mod
from logitwatch.agent.reference.schedule import SGDR, Constant, WarmupCosine, build_scheduler
from logitwatch.schedules import ScheduleConfig, lr_at


def _opt(lr=1.0, groups=1):
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def _run(opt, sched, n):
    """The LR each of the first n optimizer steps used."""
    seen = []
    for _ in range(n):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_doctests():
    assert doctest.testmod(schedule_mod).failed == 0


def test_warmup_cosine_at_chosen_steps():
    opt = _opt(lr=2.0)
    lrs = _run(opt, WarmupCosine(opt, warmup_steps=4, total_steps=24, min_ratio=0.1), 30)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[4] == pytest.approx(2.0)
    assert lrs[14] == pytest.approx(0.2 + 1.8 * 0.5)  # half way: mean of peak and floor
    expect_9 = 0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 5 / 20))
    assert lrs[9] == pytest.approx(expect_9)
    assert lrs[24:] == pytest.approx([0.2] * 6)  # the floor, held after total_steps


def test_sgdr_matches_closed_form_and_torch_warm_restarts():
    opt = _opt(lr=0.5)
    ours = _run(opt, SGDR(opt, t0=5, t_mult=2, min_ratio=0.2), 40)
    ref_opt = _opt(lr=0.5)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        ref_opt, T_0=5, T_mult=2, eta_min=0.1
    )
    assert ours == pytest.approx(_run(ref_opt, ref, 40))
    # Restarts at 5, 15, 35: back to the peak exactly there.
    for step in (0, 5, 15, 35):
        assert ours[step] == pytest.approx(0.5)
    assert ours[34] < 0.11


def test_sgdr_with_warmup_shifts_the_restarts():
    opt = _opt(lr=1.0)
    lrs = _run(opt, SGDR(opt, t0=4, warmup_steps=3, min_ratio=0.0), 12)
    cfg = ScheduleConfig("sgdr", 1.0, 3, 3, 0.0, 4, 1)
    assert lrs == pytest.approx([lr_at(cfg, s) for s in range(12)])
    assert lrs[3] == lrs[7] == lrs[11] == pytest.approx(1.0)


def test_constant_with_warmup():
    opt = _opt(lr=0.3)
    assert _run(opt, Constant(opt, warmup_steps=3), 5) == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])


@pytest.mark.parametrize("kind", ["cosine", "sgdr", "constant"])
def test_build_scheduler_follows_config_in_every_group(kind):
    cfg = ScheduleConfig(kind, 3e-3, warmup_steps=5, total_steps=50, t0=10, t_mult=2)
    opt = _opt(lr=123.0, groups=2)
    sched = build_scheduler(opt, cfg)
    for step in range(60):
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(lr_at(cfg, step), rel=1e-12)
        opt.step()
        sched.step()


def test_state_dict_resumes_same_lr_and_loads_weights_only():
    cfg = ScheduleConfig("sgdr", 1e-3, warmup_steps=2, t0=3, t_mult=2)
    opt = _opt()
    sched = build_scheduler(opt, cfg)
    _run(opt, sched, 7)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    opt2 = _opt()
    sched2 = build_scheduler(opt2, cfg)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.last_epoch == 7
    assert _run(opt2, sched2, 10) == _run(opt, sched, 10)


def test_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"schedule\.warmup_steps"):
        WarmupCosine(_opt(), warmup_steps=20, total_steps=10)
