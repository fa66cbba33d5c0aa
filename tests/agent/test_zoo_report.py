"""Zoo scoring: the divergence definition and the verdicts, on made-up loss curves."""

from __future__ import annotations

import math

import pytest

from logitwatch.agent.zoo.cases import ZooCase, ZooScale, cases_named
from logitwatch.agent.zoo.report import describe, divergence, score, smoothed
from logitwatch.agent.zoo.runs import RunOutput

KW = dict(vocab=256, warmup=10, window=10)
CONTROL = [5.5 - 3 * (1 - math.exp(-i / 20)) for i in range(100)]  # 5.5 -> ~2.5


def test_smoothed_is_a_trailing_mean_that_stays_inf_after_a_nan():
    assert smoothed([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    assert smoothed([1.0, float("nan"), 1.0], 2)[1:] == [math.inf, math.inf]


def test_divergence_definitions():
    assert divergence(CONTROL, CONTROL, **KW) == (None, "")
    nan = [*CONTROL[:40], float("nan"), *CONTROL[41:]]
    assert divergence(nan, CONTROL, **KW) == (40, "non-finite loss")
    stuck = CONTROL[:30] + [6.0] * 70  # above ln(256) = 5.55 from step 30 on
    step, reason = divergence(stuck, CONTROL, **KW)
    assert reason == "loss above ln(256)" and 30 <= step <= 40
    stall = CONTROL[:50] + [CONTROL[50]] * 50  # stops improving at step 50
    step, reason = divergence(stall, CONTROL, **KW)
    assert reason == "0.2 nats above the control" and 50 < step < 100
    blip = CONTROL[:50] + [c + 1.0 for c in CONTROL[50:60]] + CONTROL[60:]  # recovers
    assert divergence(blip, CONTROL, **KW) == (None, "")


def alert(rule, step, severity="warning", state="resolved"):
    return {"rule": rule, "first_step": step, "severity": severity, "state": state,
            "labels": {"layer": "0", "head": "1"}}  # fmt: skip


def run(losses):
    return RunOutput("x", 0, "zoo-x-s0", losses)


@pytest.mark.parametrize(
    ("alerts", "passed", "why"),
    [
        ([alert("attn-logit-growth", 20), alert("loss-spike", 30)], True, "cause named first"),
        ([alert("loss-spike", 20), alert("attn-logit-high", 25)], False, "another rule"),
        ([alert("attn-logit-high", 90)], False, "no warning before divergence"),
        ([], False, "no warning before divergence"),
    ],
)
def test_failing_case_verdicts(alerts, passed, why):
    case = cases_named(["noqk-high-lr"])[0]
    stall = CONTROL[:50] + [CONTROL[50]] * 50
    s = score(case, run(stall), alerts, CONTROL, **KW)
    assert s.diverged_at is not None and (s.passed, why in s.why) == (passed, True)
    if alerts and alerts[0]["first_step"] < s.diverged_at:
        assert s.lead_steps == s.diverged_at - alerts[0]["first_step"]


def test_control_and_spike_verdicts():
    control = cases_named(["stable-sgdr"])[0]
    assert score(control, run(CONTROL), [], CONTROL, **KW).passed
    assert not score(control, run(CONTROL), [alert("loss-spike", 40)], CONTROL, **KW).passed
    spike = cases_named(["corrupted-batches"])[0]
    ok = [alert("grad-norm-spike", 50), alert("loss-spike", 50)]
    assert score(spike, run(CONTROL), ok, CONTROL, **KW).passed
    firing = [alert("loss-spike", 50, state="firing")]
    assert score(spike, run(CONTROL), firing, CONTROL, **KW).why == "spike still firing"
    crit = [*ok, alert("nonfinite", 60, "critical")]
    assert score(spike, run(CONTROL), crit, CONTROL, **KW).why == "critical alert"


def test_describe_and_bad_settings():
    assert describe(alert("attn-logit-high", 20)) == "attn-logit-high L0/h1 @20"
    assert describe(None) == "-"
    with pytest.raises(ValueError, match="cases: unknown zoo case 'nope'"):
        cases_named(["nope"])
    with pytest.raises(ValueError, match="steps must be at least"):
        ZooScale(steps=20, every=5)
    with pytest.raises(ValueError, match="cause 'attention' does not fit kind control"):
        ZooCase("x", "control", "attention", "doc")


def test_a_failing_case_that_does_not_diverge_is_judged_on_its_warnings_alone():
    case = cases_named(["resume-lr-x10"])[0]
    warned = score(case, run(CONTROL), [alert("lr-off-schedule", 40)], CONTROL, **KW)
    assert (warned.diverged_at, warned.passed) == (None, True)
    silent = score(case, run(CONTROL), [], CONTROL, **KW)
    assert silent.passed is None and "silent" in silent.why  # no evidence either way
    wrong = score(case, run(CONTROL), [alert("loss-spike", 40)], CONTROL, **KW)
    assert wrong.passed is False
