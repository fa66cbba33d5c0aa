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


def score_stub(case, kind, run_name, diverged_at, alerts):
    from logitwatch.agent.zoo.report import Score

    return Score(case, kind, 0, run_name, diverged_at, "", None, None, None, None, True, "",
                 alerts)  # fmt: skip


def test_false_alarms_and_leads_read_the_backtest_replay_first():
    from logitwatch.agent.zoo.cases import CASES, healthy_cases
    from logitwatch.agent.zoo.report import false_alarms, leads, run_alerts

    cases = {c.name: c for c in (*CASES, *healthy_cases())}
    scores = [
        score_stub("stable", "control", "z-stable-s0", None, [alert("loss-spike", 40)]),
        score_stub("hf-llama", "control", "z-hf-s0", None, []),
        score_stub("fp16-noqk", "failing", "z-fp16-s0", 118, [alert("attn-logit-high", 25)]),
    ]
    # Without a replay: the live service's alerts, fired_step falling back to first_step.
    runs, source = run_alerts(scores, cases, None)
    assert source == "service" and [len(r.alerts) for r in runs] == [1, 0, 1]
    assert false_alarms(runs, steps_per_run=150) == (300, {"loss-spike": 1})
    first, lead, named = leads(runs[2])
    assert (first["fired_step"], lead, named) == (25, 93, True)
    # With a replay: its alerts and step spans win; info alerts never count.
    replay = {"runs": [
        {"run": "z-stable-s0", "steps": 146, "alerts": []},
        {"run": "z-hf-s0", "steps": 150, "alerts": [
            {"rule": "attn-logit-growth", "severity": "warning", "fired_step": 60,
             "metric": "attn.logit_max", "labels": {"layer": "1", "head": "2"}},
            {"rule": "grad-norm-spike", "severity": "info", "fired_step": 70}]},
        {"run": "z-fp16-s0", "steps": 115, "alerts": [
            {"rule": "loss-spike", "severity": "warning", "fired_step": 100},
            {"rule": "attn-logit-growth", "severity": "warning", "fired_step": 90}]},
    ]}  # fmt: skip
    runs, source = run_alerts(scores, cases, replay)
    assert source == "backtest"
    assert false_alarms(runs, steps_per_run=150) == (296, {"attn-logit-growth": 1})
    first, lead, named = leads(runs[2])  # the earliest by fired_step, whatever the order given
    assert (first["rule"], lead, named) == ("attn-logit-growth", 28, True)


def test_the_healthy_matrix_is_all_controls_and_every_loop():
    from logitwatch.agent.zoo.cases import TRAINERS, healthy_cases

    matrix = healthy_cases()
    assert {c.kind for c in matrix} == {"control"}
    assert {c.trainer for c in matrix} == set(TRAINERS)
    presets = {c.overrides.get("preset") for c in matrix} - {None}
    assert presets == {"gpt3", "t5", "t5-v1.1", "lamda", "palm", "llama2"}
    with pytest.raises(ValueError, match="trainer must be one of"):
        ZooCase("x", "control", None, "doc", trainer="keras")


def test_lead_and_false_alarm_tables_fit_80_columns():
    from logitwatch.agent.cli.zoo import false_alarm_table, lead_table
    from logitwatch.agent.zoo.run import ZooResult
    from logitwatch.tables import render_text

    scores = [
        score_stub("stable", "control", "z-stable-s0", None, [alert("run-silent", 145)]),
        score_stub("fp16-noqk", "failing", "z-fp16-s0", 109, []),
        score_stub("noqk-high-lr", "failing", "z-noqk-s0", 65, []),
    ]
    replay = {"runs": [
        {"run": "z-stable-s0", "steps": 236, "alerts": [
            {"rule": "attn-logit-growth", "severity": "warning", "fired_step": 80, "value": 20.5,
             "threshold": 19.9, "metric": "attn.logit_max", "labels": {"layer": "3", "head": "1"}}]},
        {"run": "z-fp16-s0", "steps": 105, "alerts": [
            {"rule": "attn-logit-high", "severity": "warning", "fired_step": 30,
             "metric": "attn.logit_max", "labels": {"layer": "0", "head": "0"}}]},
        {"run": "z-noqk-s0", "steps": 236, "alerts": [
            {"rule": "attn-logit-growth", "severity": "warning", "fired_step": 40,
             "metric": "attn.logit_max", "labels": {"layer": "0", "head": "1"}}]},
    ]}  # fmt: skip
    result = ZooResult(ZooScale(), scores, [], 1.0, "", backtest=replay)
    leads_text = render_text(lead_table(result), width=80)
    assert all(len(line) <= 80 for line in leads_text.splitlines())
    for cell in ("@109", "attn-logit-high", "79", "25", "min 25", "median 52"):
        assert cell in leads_text, cell
    text = render_text(*false_alarm_table(result), width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
    # Replayed: one growth alert on 236 healthy steps (4.24 per 1,000); live: one run-silent.
    for cell in ("attn-logit-growth", "run-silent", "4.24", "attn.logit_max L3/h1", "20.5"):
        assert cell in text, cell
