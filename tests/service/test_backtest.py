"""`logitwatch backtest`: runs of known shape replayed through the service's rule engine."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers.server import live_server

from logitwatch.cli import main
from logitwatch.client import points_path
from logitwatch.protocol import Batch, Series, encode_batch
from logitwatch.service.rules.builtin import builtin_rules

NAN_AT = 180  # the growing run's loss is NaN from here on
SPIKE = range(50, 55)  # the healthy run's one loss excursion above 5
GRAD_BURSTS = (50, 200, 350)  # ... and its three 10-step gradient bursts above 10

RULES = """\
rules:
  - name: loss-high
    metric: loss
    condition: {kind: threshold, op: ">", value: 5}
    for_steps: 3
  - name: grad-high
    metric: grad.norm
    condition: {kind: threshold, op: ">", value: 10}
    severity: critical
"""


def grow_loss(step: int) -> float:
    """Flat at 3, then 5 % a step from step 100, NaN at NAN_AT."""
    if step >= NAN_AT:
        return math.nan
    return 3.0 if step < 100 else 3.0 * 1.05 ** (step - 100)


def healthy(step: int) -> tuple[float, float]:
    """(loss, grad norm): a falling loss with one spike, gradients with three bursts."""
    loss = 6.0 if step in SPIKE else 4.0 - step / 200
    grad = 20.0 if any(b <= step < b + 10 for b in GRAD_BURSTS) else 1.0
    return loss, grad


def batches(steps: range, fn, *, per_batch: int = 10, segment: int = 0, seq: int = 0):
    """The agent's batches of (loss, grad.norm) points, `per_batch` steps each."""
    out = []
    for i in range(0, len(steps), per_batch):
        ss = list(steps[i : i + per_batch])
        vals = [fn(s) for s in ss]
        series = [Series("loss", {}, ss, [v[0] for v in vals]),
                  Series("grad.norm", {}, ss, [v[1] for v in vals])]  # fmt: skip
        out.append(Batch("c1", seq + len(out), segment, series))
    return out


def grow(step: int) -> tuple[float, float]:
    return grow_loss(step), 1.0


def write_filesink(path: Path, run: str, bs: list[Batch]) -> Path:
    """A file as the agent's FileSink writes it: header, run registration, one batch a line."""
    lines = [json.dumps({"run": run, "client": "c1", "created": 0.0}),
             json.dumps({"run": run, "config": {"lr": 1e-3}, "tags": {}})]  # fmt: skip
    lines += [encode_batch(b, fmt="json").decode() for b in bs]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_step_lines(path: Path, steps: range) -> Path:
    """A file as `logitwatch train --metrics-out` writes it: one object per step."""
    rows = [{"step": s, "loss": grow_loss(s), "lr": 1e-3, "grad_norm": 1.0} for s in steps]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def backtest_json(capsys, *argv: str) -> dict:
    assert main(["backtest", "--json", "--quiet", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def by_rule(doc: dict) -> dict[str, dict]:
    return {f["rule"]: f for f in doc["rules"]}


@pytest.fixture
def files(tmp_path) -> list[str]:
    grow_file = write_step_lines(tmp_path / "grow.jsonl", range(NAN_AT + 5))
    healthy_file = write_filesink(tmp_path / "h.jsonl", "healthy-a", batches(range(400), healthy))
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    return [str(grow_file), str(healthy_file), "--rules", str(rules)]


def test_firing_step_lead_time_false_alarms_and_flaps(files, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    doc = backtest_json(capsys, *files, "--no-builtins", "--healthy", "healthy-*")

    runs = {r["run"]: r for r in doc["runs"]}
    assert (runs["grow"]["status"], runs["grow"]["diverged_at"]) == ("diverged", NAN_AT)
    assert runs["grow"]["reason"] == "non-finite loss"
    assert (runs["healthy-a"]["status"], runs["healthy-a"]["steps"]) == ("healthy", 400)
    assert doc["healthy_steps"] == 400

    loss, grad = by_rule(doc)["loss-high"], by_rule(doc)["grad-high"]
    # for_steps: 3 fires on the third step above 5
    above = next(s for s in range(NAN_AT) if grow_loss(s) > 5)
    assert loss["fired_step"] == {"grow": above + 2}
    assert loss["lead_steps"] == {"grow": NAN_AT - above - 2}
    assert loss["lead_median"] == loss["lead_min"] == NAN_AT - above - 2
    assert (loss["runs_fired"], loss["false_alarms"], loss["flaps"]) == (2, 1, 0)
    assert loss["false_alarms_per_1k"] == pytest.approx(1000 / 400)
    # three separate bursts on the healthy run: three alarms, two of them flaps
    assert grad["fired_step"] == {"grow": None} and grad["lead_median"] is None
    assert (grad["runs_fired"], grad["false_alarms"], grad["flaps"]) == (1, 3, 2)
    healthy_alerts = [a for a in runs["healthy-a"]["alerts"] if a["rule"] == "grad-high"]
    assert [a["fired_step"] for a in healthy_alerts] == list(GRAD_BURSTS)
    assert doc["any"]["false_alarms"] == 4 and doc["any"]["lead_min"] == NAN_AT - above - 2
    # the throwaway database is gone
    assert not list(tmp_path.glob("logitwatch-backtest-*"))

    # A divergence the user gives wins over the detected one; unmarked runs raise no false alarm.
    doc = backtest_json(capsys, *files, "--no-builtins", "--diverged", "grow=150")
    loss = by_rule(doc)["loss-high"]
    assert loss["lead_steps"] == {"grow": 150 - above - 2}
    assert {r["run"]: r["status"] for r in doc["runs"]}["healthy-a"] == "unlabelled"
    assert loss["false_alarms"] == 0 and loss["false_alarms_per_1k"] is None


def test_table_names_every_rule_that_fired(files, capsys):
    assert main(["backtest", "--quiet", *files, "--healthy", "healthy-a"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    for word in ("loss-high", "grad-high", "nonfinite", "(any rule)", "never fired"):
        assert word in out


def test_a_candidate_file_replaces_built_ins_of_its_names(files, tmp_path, capsys):
    off = tmp_path / "off.yaml"
    off.write_text(RULES + "  - {name: nonfinite, metric: loss, condition: {kind: nonfinite},"
                   " enabled: false}\n")  # fmt: skip
    doc = backtest_json(capsys, *files[:2], "--rules", str(off))
    names = {f["rule"] for f in doc["rules"]}
    assert "nonfinite" not in names and {"loss-high", "nonfinite-count"} <= names
    # the divergence is still found: it is the loss, not the rule
    assert doc["runs"][0]["diverged_at"] == NAN_AT


def _post(c: httpx.Client, run: str, bs: list[Batch]) -> None:
    for b in bs:
        r = c.post(points_path(run), content=encode_batch(b),
                   headers={"content-type": "application/msgpack"})  # fmt: skip
        assert r.status_code == 200, r.text


def test_runs_read_from_a_live_service_replay_as_the_service_saw_them(tmp_path, capsys):
    grow_bs = batches(range(150), grow)
    # resumed from a checkpoint at step 100: a second segment rewrites steps 100-149
    grow_bs += batches(range(100, NAN_AT + 5), grow, segment=1, seq=len(grow_bs))
    healthy_bs = batches(range(400), healthy)
    absent = {r.name for r in builtin_rules() if r.condition.kind == "absent"}
    with live_server(f"sqlite:///{tmp_path / 'live.db'}") as server, server.client() as c:
        _post(c, "bt-grow", grow_bs)
        _post(c, "bt-healthy", healthy_bs)
        _post(c, "other", batches(range(10), healthy))
        live = c.get("/api/v1/alerts", params={"limit": 10_000}).json()["alerts"]
        cmd = [sys.executable, "-m", "logitwatch", "backtest", "--server", server.url,
               "bt-*", "--healthy", "bt-healthy", "--min-severity", "info", "--json"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [r["run"] for r in doc["runs"]] == ["bt-grow", "bt-healthy"]

    # The replay raises the alerts the live service raised, at the same steps.
    def key(a: dict, run: str) -> tuple:
        return run, a["rule"], a["metric"], a["fired_step"], a["resolved_step"]

    seen = sorted(key(a, r["run"]) for r in doc["runs"] for a in r["alerts"])
    want = sorted(key(a, a["run"]) for a in live
                  if a["run"] != "other" and a["rule"] not in absent)  # fmt: skip
    assert seen == want and seen
    nonfinite = by_rule(doc)["nonfinite"]
    assert nonfinite["fired_step"] == {"bt-grow": NAN_AT} and nonfinite["lead_min"] == 0

    # The same batches from files score the same.
    grow_file = write_filesink(tmp_path / "g.jsonl", "bt-grow", grow_bs)
    healthy_file = write_filesink(tmp_path / "h.jsonl", "bt-healthy", healthy_bs)
    from_files = backtest_json(capsys, str(grow_file), str(healthy_file),
                               "--healthy", "bt-healthy", "--min-severity", "info")  # fmt: skip
    assert from_files["rules"] == doc["rules"] and from_files["any"] == doc["any"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--rules", "{rules}", "--no-builtins"], "rules[0].condition.value"),
        (["--diverged", "grow=soon"], "--diverged wants RUN=STEP"),
        (["--diverged", "nosuch=10"], "--diverged names no run given: nosuch"),
        (["--healthy", "nosuch-*"], "--healthy 'nosuch-*' matches no run given"),
        (["--no-builtins"], "--no-builtins leaves no rules"),
        (["{missing}"], "missing.jsonl: no such file"),
        (["{damaged}"], "damaged.jsonl:1: not a JSON line"),
    ],
)
def test_bad_input_is_named(tmp_path, capsys, argv, says):
    grow_file = write_step_lines(tmp_path / "grow.jsonl", range(20))
    bad_rules = tmp_path / "bad.yaml"
    bad_rules.write_text(RULES.replace("value: 5", "value: five"))
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text('{"step": 1, "loss": \n{"step": 2, "loss": 1.0}\n')
    paths = {"rules": bad_rules, "missing": tmp_path / "missing.jsonl", "damaged": damaged}
    argv = [a.format(**paths) for a in argv]
    argv = ["backtest", "--quiet", str(grow_file), *argv]
    if "RUN=STEP" in says:  # argparse's own check of the flag
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err, err
