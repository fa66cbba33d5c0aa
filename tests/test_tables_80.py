"""Every CLI and benchmark table read at 80 columns: no line longer, no header word or figure cut
("…"), every header word and every figure there in full; real data, 7-digit figures included."""

from __future__ import annotations

import importlib
import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.server import thread_server
from rich.cells import cell_len
from rich.console import Console

from logitwatch.cli import main
from logitwatch.tables import render_text

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 80
RUN = "pretrain-7b-width-check"
BIG_STEP = 1_234_567


def check(text: str, headers: list[str], figures: list[str]) -> None:
    """`text` (what was printed) fits WIDTH and holds each header word and figure whole."""
    assert text.strip(), "nothing was printed"
    long = [line for line in text.splitlines() if cell_len(line.rstrip()) > WIDTH]
    assert not long, "lines wider than 80 columns:\n" + "\n".join(long)
    assert "…" not in text, f"a cell or header was cut:\n{text}"
    # Tokens between spaces and the table's rules: a header word or figure split over two
    # lines, or folded, is not among them.
    tokens = set(re.split(r"[\s│┃║┆┇|]+", text))
    missing = [w for h in headers for w in h.split() if w not in tokens]
    missing += [f for f in figures if f not in tokens]
    assert not missing, f"not shown whole: {missing}\n{text}"


# --- logitwatch runs | series | query | alerts, against a real service -------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from logitwatch.protocol import Batch, encode_batch, series_from_columns
    from logitwatch.service.app import create_app
    from logitwatch.service.settings import load_settings
    from logitwatch.service.store.db import upgrade

    db = f"sqlite:///{tmp_path_factory.mktemp('w80') / 'lw.db'}"
    upgrade(db)
    app = create_app(load_settings(db_url=db))
    steps = [BIG_STEP - 2, BIG_STEP - 1, BIG_STEP]
    series = [
        series_from_columns("loss", {}, steps, [1234567.0, 5.25, math.nan]),
        series_from_columns(
            "attn.logit_max", {"layer": "11", "head": "15"}, steps, [3.2, 40.5, 2500000.0]
        ),
    ]
    with thread_server(app) as srv, srv.client() as c:
        tags = {"team": "pretraining", "zone": "north-7"}
        c.put(f"/api/v1/runs/{RUN}", json={"tags": tags}).raise_for_status()
        body = encode_batch(Batch("w80", 1, 0, series))
        headers = {"content-type": "application/msgpack"}
        c.post(f"/api/v1/runs/{RUN}/points", content=body, headers=headers).raise_for_status()
        yield srv


def _cli(capsys, monkeypatch, *argv: str) -> tuple[str, dict]:
    """What the command prints at 80 columns, and its --json answer."""
    monkeypatch.setenv("COLUMNS", str(WIDTH))  # rich's width for a terminal of 80 columns
    assert main(list(argv)) == 0
    text = capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    return text, json.loads(capsys.readouterr().out)


def test_runs(server, capsys, monkeypatch):
    text, doc = _cli(capsys, monkeypatch, "runs", "--server", server.url)
    (run,) = doc["runs"]
    assert run["last_step"] == BIG_STEP
    check(text, ["run", "series", "segment", "last step", "last seen", "tags"],
          [RUN, str(BIG_STEP), str(run["n_series"]), "team=pretraining", "zone=north-7"])  # fmt: skip


def test_series(server, capsys, monkeypatch):
    text, doc = _cli(capsys, monkeypatch, "series", RUN, "--server", server.url)
    check(text, ["metric", "labels", "points", "first step", "last step", "last value"],
          [str(BIG_STEP), str(BIG_STEP - 2), "2.5e+06", "NaN", "head=15,layer=11"])  # fmt: skip
    assert len(doc["series"]) == 2


def test_query_points_and_buckets(server, capsys, monkeypatch):
    text, _ = _cli(capsys, monkeypatch, "query", RUN, "loss", "--server", server.url)
    check(text, ["step", "value", "time (UTC)"], [str(BIG_STEP), "1.23457e+06", "5.25", "NaN"])
    argv = ("query", RUN, "attn.logit_max", "--max-points", "2", "--server", server.url)
    text, doc = _cli(capsys, monkeypatch, *argv)
    (s,) = doc["series"]
    figures = [str(v) for v in (*s["steps"], *s["last_steps"], *s["count"], *s["nan"])]
    check(text, ["first step", "last step", "count", "min", "max", "last", "NaN"],
          [*figures, "3.2", "40.5", "2.5e+06"])  # fmt: skip


def test_alerts(server, capsys, monkeypatch):
    text, doc = _cli(capsys, monkeypatch, "alerts", "--server", server.url, "--run", RUN)
    assert {a["rule"] for a in doc["alerts"]} >= {"nonfinite"}
    headers = ["id", "run", "rule", "severity", "state", "metric", "labels", "fired", "last"]
    fired = [a for a in doc["alerts"] if a["state"] == "firing"]
    assert fired and all(a["fired_step"] == BIG_STEP for a in fired)  # loss NaN, logits 2.5e6
    figures = [w for a in doc["alerts"] for w in (str(a["id"]), a["rule"], str(a["last_step"]))]
    figures += [str(a["fired_step"]) for a in fired]
    check(text, [*headers, "hint"], figures)
    hints = [w for a in doc["alerts"] for w in (a["hint"] or "").split()]
    assert hints and not [w for w in hints if w not in text]  # wrapped at words, not cut


def test_token_list(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    db = f"sqlite:///{tmp_path / 'tokens.db'}"
    for name in ("ci-ingest-for-the-pretraining-7b", "dashboards"):
        assert main(["token", "create", "--name", name, "--scope", "read", "--run", "team-a-*",
                     "--db", db]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["token", "list", "--db", db]) == 0
    check(capsys.readouterr().out, ["id", "name", "scope", "runs", "created", "revoked"],
          ["1", "2", "ci-ingest-for-the-pretraining-7b", "team-a-*"])  # fmt: skip


# --- logitwatch presets | lint | train | zoo, and the demo's live tables ------------------------


def test_presets(capsys, monkeypatch):
    from logitwatch.agent.reference.presets import PRESETS, get_preset

    monkeypatch.setenv("COLUMNS", str(WIDTH))
    assert main(["presets", "--full"]) == 0  # the wider of the two: published sizes and paper
    configs = [get_preset(name, full=True) for name in PRESETS]
    figures = [str(getattr(c, k)) for c in configs for k in ("n_layers", "n_heads", "d_model")]
    headers = ["name", "layers", "heads", "kv", "hd", "d_model", "nh·hd/d", "d_ff/d", "d/L"]
    check(capsys.readouterr().out, [*headers, "FFN", "params", "paper"],
          [*PRESETS, *figures, "16.00", "64.00", "540.4B", "175B"])  # fmt: skip


@pytest.mark.parametrize("preset", ["t5", "palm"])
def test_lint(preset, capsys, monkeypatch):
    from logitwatch.agent.reference.presets import get_preset

    monkeypatch.setenv("COLUMNS", str(WIDTH))
    main(["lint", "--preset", preset, "--full"])
    config = get_preset(preset, full=True)
    check(capsys.readouterr().out, ["why:", "source:"],
          [f"{config.d_model},", str(config.n_layers), str(config.d_ff), "finding(s):"])  # fmt: skip


def test_train_summary():
    from logitwatch.agent.cli.train import summary_table

    rows = [("parameters", "1,234,567,890"), ("steps", "0 → 1234567"),
            ("last loss (mean of last 10)", "2.0123"), ("tokens/s", "1,234,567"),
            ("checkpoint", "/home/someone/experiments/llama2-7b/.logitwatch/checkpoints/step-1234567.pt"),
            ("monitored run", "hot → http://logitwatch.cluster.internal:8000")]  # fmt: skip
    text = render_text(summary_table("logitwatch train: llama2", rows), width=WIDTH)
    check(text, [k for k, _ in rows], ["1,234,567,890", "1234567", "1,234,567", "2.0123"])
    assert rows[4][1] in re.sub(r"[\s│]+", "", text)  # a long path folds, whole


def test_zoo_table():
    from logitwatch.agent.cli.zoo import print_table
    from logitwatch.agent.zoo.cases import ZooScale
    from logitwatch.agent.zoo.report import Score
    from logitwatch.agent.zoo.run import ZooResult

    def alert(rule, step, severity="warning"):
        return {"rule": rule, "first_step": step, "severity": severity,
                "labels": {"layer": "11", "head": "15"}}  # fmt: skip

    scores = [
        Score("noqk-high-lr", "failing", 0, "zoo-noqk-s0", 1_234_567, "non-finite loss",
              alert("attn-logit-growth", 1_234_000), alert("nonfinite", 1_234_567, "critical"),
              567, True, True, "cause named first", final_loss=1234567.0),
        Score("stable-sgdr", "control", 2, "zoo-stable-s2", None, "", None, None, None, None,
              True, "silent", final_loss=2.345),
        Score("corrupted-batches", "spike", 1, "zoo-spike-s1", None, "",
              alert("loss-spike", 120), None, None, None, False, "spike still firing",
              final_loss=3.5),
    ]  # fmt: skip
    result = ZooResult(ZooScale(), scores, [], 1234.0, "http://127.0.0.1:8000")
    console = Console(width=WIDTH, record=True, file=io.StringIO())
    print_table(result, console)
    text = console.export_text()
    check(text, ["case", "diverged", "first alerts", "lead", "final loss", "verdict"],
          ["@1234567", "@1234000", "@1234567", "567", "1234567.000", "2.345", "pass", "FAIL",
           "noqk-high-lr", "corrupted-batches", "L11/h15"])  # fmt: skip


def test_demo_tables():
    from logitwatch.demo import RunView, _table

    hint = "attention logits in layer 11 are growing: enable QK-norm or soft-cap them at 50"
    views = [
        RunView("demo-healthy", "QK-norm + z-loss 1e-4, warmup + cosine", 1_234_567, 2.0123,
                12.5, 3.25),
        RunView("demo-no-qknorm", "no QK-norm, no z-loss, LR 0.03", 1_234_000, 5.875,
                1234567.0, 45.5, [
                    {"rule": "attn-logit-growth", "severity": "warning", "state": "firing",
                     "first_step": 1_200_000, "labels": {"layer": "11", "head": "3"},
                     "hint": hint},
                    {"rule": "nonfinite", "severity": "critical", "state": "firing",
                     "first_step": 1_234_000, "labels": {}, "hint": "restart from a checkpoint"},
                ]),
    ]  # fmt: skip
    text = render_text(_table(views, 2_000_000), width=WIDTH)
    headers = ["run", "step", "loss", "attn max logit", "log Z mean", "open alerts"]
    check(text, [*headers, "rule", "first step", "series", "hint"],
          ["1234567/2000000", "2.012", "1234567.0", "45.50", "1200000", "1234000", "critical", "warning,",
           "layers", "11", "attn-logit-growth", *hint.split()])  # fmt: skip


# --- benchmarks: their table-building functions with representative figures --------------------


@pytest.fixture
def benchmarks(monkeypatch):
    """Import a module of benchmarks/ (they import their siblings by bare name)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module


def test_ingest_report(benchmarks):
    ingest = benchmarks("ingest")
    floors = benchmarks("ingest_floors")
    ingests = {
        "logitwatch SQLite": floors.Ingest(2_000_000, 1.234, 23_456_789),
        "logitwatch PostgreSQL": floors.Ingest(2_000_000, 2.5, 31_234_567),
        "raw SQLite floor": floors.Ingest(2_000_000, 1.5, 45_678_901),
        "raw PostgreSQL floor": floors.Ingest(2_000_000, 3.25, 98_765_432),
        "MLflow server (SQLite)": floors.Ingest(1_000, 12.5, 1_234_567, 1_000, 0.25),
    }
    reads = {
        "logitwatch SQLite": ingest.Reads(0.0123, 0.4567, 0.0089),
        "logitwatch PostgreSQL": ingest.Reads(0.0234, 1234.5, 0.0123),
    }
    console = Console(width=WIDTH, record=True, file=io.StringIO())
    ingest.report(console, ingest.FULL, ingests, reads)
    text = console.export_text()
    rate = f"{2_000_000 / 1.234:,.0f}"
    check(text, ["system", "points", "seconds", "points/s", "vs MLflow", "bytes per point",
                 "1,000,000 points in 1,000 buckets", "all 1,000,000 points",
                 "all 100,000 points", "target", "measured", "met"],
          ["2,000,000", "1.23", rate, "11.7", "12.3", "456.7", "1,234,500.0", "8.9", "250.0",
           "MLflow", "1,000"])  # fmt: skip


def test_agent_overhead_tables(benchmarks):
    bench = benchmarks("agent_overhead")
    title = "Step time, 4 layers, d_model 256, seq 256, batch 8 (CPU, 2 threads, 60 steps per arm)"
    rows = [("no monitor", 1234567.8, 1.0, "", 1234.5, 1.0, (1.0, 1.0)),
            ("every=1", 1271604.8, 1.03, "<= 1.03 NOT met", 1271.5, 1.03, (1.0123, 1.0456))]  # fmt: skip
    text = render_text(bench.overhead_table(title, rows), width=WIDTH)
    check(text, ["arm", "median ms", "ratio", "blocks", "target", "CPU ms", "CPU ratio"],
          ["1,234,567.8", "1,271,604.8", "1.0300", "1,271.5", "every=1", "NOT",
           "1.012-1.046"])  # fmt: skip
    costs = [
        ("attn_stats, one layer (x4)", 1234.5678, 1000.25),
        ("device-to-host copy of the buffer", 0.012, 0.011),
    ]
    text = render_text(bench.breakdown_table(costs, 30), width=WIDTH)
    check(text, ["probe", "ms", "CPU ms"], ["1,234.568", "1,000.250", "0.012"])


def test_transport_table(benchmarks):
    transport = benchmarks("transport")
    rows = [
        {"transport": "logitwatch HttpSink", "median_ms": 0.0123, "mean_ms": 0.0145,
         "p99_ms": 0.123, "close_s": 0.05, "background_cpu_ms": 0.456},
        {"transport": "logitwatch HttpSink (service down: spool)", "median_ms": 0.0234,
         "mean_ms": 0.0256, "p99_ms": 0.234, "close_s": 0.06},
        {"transport": "W&B (offline)", "median_ms": 1234.5678, "mean_ms": 2345.6789,
         "p99_ms": 3456.789, "close_s": 1234567.89},
        {"transport": "MLflow (async, file store)", "error": "ModuleNotFoundError: mlflow"},
    ]  # fmt: skip
    text = transport.format_rows(rows, width=WIDTH)
    check(text, ["transport", "median ms", "mean ms", "p99 ms", "close s", "vs ours",
                 "sender CPU ms/step"],
          ["0.0123", "1234.5678", "2345.6789", "3456.789", "1234567.89", "100371.4", "0.456",
           "ModuleNotFoundError:", "mlflow"])  # fmt: skip


def test_zoo_summary(benchmarks):
    zoo = benchmarks("zoo")
    from logitwatch.agent.zoo.report import Score

    def score(kind, passed, diverged=None, lead=None):
        return Score("c", kind, 0, "r", diverged, "", None, None, lead, None, passed, "")

    scores = [score("control", True), score("failing", True, 1_234_567, 1_234_000),
              score("failing", None), score("spike", False)]  # fmt: skip
    text = render_text(zoo.summary_table(SimpleNamespace(scores=scores)), width=WIDTH)
    check(text, ["kind", "pass", "n/a", "diverged", "warned first", "lead median", "lead min"],
          ["control", "failing", "spike", "1/1", "1/2", "1234000", "0/1"])  # fmt: skip


def test_records_choose_a_layout_for_the_width():
    from logitwatch.tables import Col, Records, num

    table = Records([Col("run", readable=20), num("last step"), num("value"), Col("hint")])
    table.add_row("pretrain-7b-a", "1234567", "1.23457e+06", "enable QK-norm or soft-cap at 50")
    wide = render_text(table, width=200).splitlines()
    assert wide[0].split() == ["run", "last", "step", "value", "hint"]  # one header line
    assert "…" not in "\n".join(wide) and len(wide) == 3  # header, rule, the row
    for width in range(24, 121, 4):  # from stacked through squeezed to natural, never wider
        text = render_text(table, width=width)
        check(
            text, ["run", "last step", "value", "hint"], ["pretrain-7b-a", "1234567", "1.23457e+06"]
        )
        assert max(cell_len(line.rstrip()) for line in text.splitlines()) <= width
    narrow = render_text(table, width=40)
    assert narrow.splitlines()[0].split() == ["run", "pretrain-7b-a"]  # a block per row


def test_load_report(benchmarks):
    load = benchmarks("load")
    cap = {"rps": 2_345.6, "pps": 469_120.0, "cpu_ms": 0.9123, "p50_ms": 7.25, "p99_ms": 15_455.6,
           "errors": 0}  # fmt: skip
    agent = {"sent": 24_000, "stored": 24_000, "stored_live": 21_000, "pending": 15,
             "p50_ms": 12.25, "p99_ms": 40.5}  # fmt: skip
    result = {"label": "SQLite", "cap": cap, "runs": 1_000, "delivered_rps": 999.5,
              "p50_ms": 7.5, "p99_ms": 1_234_567.8, "steady_p99_ms": 98_765.4,
              "sent": 12_000_000, "stored": 11_999_800,
              "skipped": 1_234_000, "fleet_cpu_ms": 1.2345, "errors": 0, "nan_runs": 20,
              "api_p50": 0.35, "api_max": 1.25, "api_seen": 20, "answer_p50": 0.3,
              "answer_max": math.nan, "answer_seen": 0, "agent": agent, "rss_mb": 281.4,
              "false_alarms": 12_345}  # fmt: skip
    results = [result, {**result, "label": "PostgreSQL"}, {**result, "label": "PostgreSQL ×2"}]
    console = Console(width=WIDTH, record=True, file=io.StringIO())
    assert not load.report(results, SimpleNamespace(series=200), console)  # points missing
    text = console.export_text()
    check(text, ["measure", "SQLite", "PostgreSQL", "PostgreSQL ×2", "target"],
          ["2,346", "469,120", "0.91", "15,455.6", "1,234,567.8", "98,765.4", "12,000,000", "11,999,800",
           "1,234,000", "1.25", "0/20", "400,000", "21,000", "15", "12,345", "FAILED:",
           "BEHIND:"])  # fmt: skip
    assert "alerts on healthy runs" in text


def test_load_template_patches_each_request(benchmarks):
    """The fleet's requests carry their own seq, step, time and values (noisy levels)."""
    import numpy as np

    from logitwatch.protocol import decode_batch

    load = benchmarks("load")
    template = load.Template("fleet-3", 200)
    levels = template.levels(3)
    rng = np.random.default_rng(0)
    first, second = template.values(levels, rng), template.values(levels, rng)
    assert not np.array_equal(first, second)  # a healthy run's values move step to step
    assert np.all(np.abs(first / levels - 1) < 0.6)  # around the levels
    device = np.array([m not in load.HOST for m, _, _ in load.report_series(200)])
    assert np.array_equal(first[device], first[device].astype(np.float32))  # as the agent's
    first[0] = float("nan")
    batch = decode_batch(template.body(41, 40, 1234.5, first), "application/msgpack")
    assert (batch.client, batch.seq, len(batch.series)) == ("fleet-3", 41, 200)
    assert [s.steps[0] for s in batch.series] == [40] * 200
    assert [s.times[0] for s in batch.series] == [1234.5] * 200
    got = np.array([s.values[0] for s in batch.series])
    assert np.isnan(got[0]) and batch.series[0].metric == "loss"
    assert np.array_equal(got[1:], first[1:])


def test_read_table(benchmarks):
    read = benchmarks("read")
    rows = [("SQLite", 0.0162, 0.0544, True, 30), ("PostgreSQL", 0.0126, 1234.5678, False, 1_234)]
    text = render_text(read.table(rows, 1_000_000, 1_000, 7), width=WIDTH)
    check(text, ["database", "summaries ms", "points ms", "speed-up", "summarized chunks",
                 "same answer"],
          ["16.2", "54.4", "3.4×", "1,234,567.8", "1,234", "NO", "12.6"])  # fmt: skip
