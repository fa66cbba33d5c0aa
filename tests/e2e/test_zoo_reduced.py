"""The reduced instability zoo: real training through the real agent into a real service process.

Four runs of 150 steps (two at a time): the stable control, the same with SGDR restarts,
no QK-norm at a high LR, and the stable recipe with two corrupted batches.
"""

from __future__ import annotations

import pytest
from helpers.server import live_server

from logitwatch.agent.zoo.cases import CAUSES, REDUCED, cases_named
from logitwatch.agent.zoo.run import run_zoo

BAD = ("warning", "critical")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    cases = cases_named(["stable", "stable-sgdr", "noqk-high-lr", "corrupted-batches"])
    with live_server(f"sqlite:///{tmp}/zoo.db") as server:
        result = run_zoo(cases, REDUCED, server=server.url, jobs=2, out=tmp / "out")
    return result, {s.case: s for s in result.scores}, tmp / "out"


def test_every_run_trained_and_reported(zoo):
    result, scores, _ = zoo
    assert sorted(scores) == ["corrupted-batches", "noqk-high-lr", "stable", "stable-sgdr"]
    for out in result.outputs:
        assert out.error is None and len(out.losses) == REDUCED.steps
        assert out.series["loss"][""][0][-1] == REDUCED.steps - REDUCED.every  # last report


@pytest.mark.parametrize("case", ["stable", "stable-sgdr"])
def test_stable_controls_raise_nothing(zoo, case):
    _, scores, _ = zoo
    loud = [(a["rule"], a["first_step"]) for a in scores[case].alerts if a["severity"] in BAD]
    assert loud == []
    assert scores[case].diverged_at is None


def test_no_qk_norm_warns_about_attention_before_it_diverges(zoo):
    _, scores, _ = zoo
    s = scores["noqk-high-lr"]
    assert s.diverged_at is not None, "the no-QK-norm run should fall behind the control"
    assert s.first_warning is not None and s.first_warning["first_step"] < s.diverged_at
    assert s.first_warning["rule"] in CAUSES["attention"]  # the real cause, named first
    assert "layer" in s.first_warning["labels"]  # and where
    assert "QK-norm" in s.first_warning["hint"]
    assert s.cause_first and s.passed


def test_corrupted_batches_raise_a_spike_warning_that_resolves(zoo):
    result, scores, _ = zoo
    s = scores["corrupted-batches"]
    spikes = [a for a in s.alerts if a["rule"] in CAUSES["data"]]
    assert spikes, "a corrupted batch should raise a loss or gradient-norm spike warning"
    (run,) = [o for o in result.outputs if o.case == "corrupted-batches"]
    assert min(a["first_step"] for a in spikes) in run.corrupted_steps
    assert all(a["state"] == "resolved" for a in spikes)
    assert all(a["severity"] != "critical" for a in s.alerts)
    assert s.passed


def test_results_and_plots_are_written(zoo):
    _, scores, out = zoo
    assert (out / "zoo.json").stat().st_size > 1000
    for case in scores:
        png = out / f"{case}-s0.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_metrics_files_are_replayed_by_backtest_with_the_zoo_labels(zoo):
    result, scores, out = zoo
    assert len(list((out / "metrics").glob("*.jsonl"))) == 4
    assert result.backtest_error is None
    replayed = {r["run"]: r for r in result.backtest["runs"]}
    assert set(replayed) == {s.run for s in scores.values()}
    for case in ("stable", "stable-sgdr"):
        assert replayed[scores[case].run]["status"] == "healthy"
    noqk = replayed[scores["noqk-high-lr"].run]
    assert (
        noqk["status"] == "diverged" and noqk["diverged_at"] == scores["noqk-high-lr"].diverged_at
    )
    loud = [a for a in noqk["alerts"] if a["severity"] in BAD]
    first = min(loud, key=lambda a: a["fired_step"])
    assert first["rule"] in CAUSES["attention"]  # the replay agrees on the cause
