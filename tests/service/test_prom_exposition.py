"""GET /metrics: run gauges read from `latest` (max over heads, bounded), the service's own figures,
valid for promtool, and summed across worker processes."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from helpers.server import live_server
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from logitwatch.protocol import Batch, encode_batch, series_from_columns
from logitwatch.service.api.prom import worker_metrics_dir
from logitwatch.service.store.models import Run

MSGPACK = {"content-type": "application/msgpack"}


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _batch(seq: int = 0) -> bytes:
    nan = math.nan
    series = [
        series_from_columns("loss", {}, [1, 2, 3], [4.0, 3.5, 3.25]),
        series_from_columns("attn.logit_max", {"layer": "0", "head": "0"}, [3], [12.0]),
        series_from_columns("attn.logit_max", {"layer": "0", "head": "1"}, [3], [30.5]),
        series_from_columns("attn.logit_max", {"layer": "1", "head": "0"}, [3], [nan]),
        series_from_columns("attn.logit_max", {"layer": "1", "head": "1"}, [3], [99.0]),
        series_from_columns("grad.norm", {"layer": "2", "shard": "7", "head": "1"}, [3], [0.5]),
        series_from_columns("user.thing", {"layer": "0"}, [3], [1.0]),
    ]
    return encode_batch(Batch("trainer", seq, 0, series))


def test_run_gauges_fold_heads_and_stay_bounded(client, run_name):
    assert client.post(
        f"/api/v1/runs/{run_name}/points", content=_batch(), headers=MSGPACK
    ).is_success
    text = client.get("/metrics").text
    got = _samples(text)
    run = ("run", run_name)
    assert got[("logitwatch_loss", (run,))] == 3.25
    assert got[("logitwatch_attn_logit_max", (("layer", "0"), run))] == 30.5
    # a NaN in any head is what the gauge must show, whatever max() would pick
    assert math.isnan(got[("logitwatch_attn_logit_max", (("layer", "1"), run))])
    # labels outside the catalogue's are folded away; metrics outside it are not exposed
    assert got[("logitwatch_grad_norm", (("layer", "2"), run))] == 0.5
    assert not [k for k in got if "head" in dict(k[1]) or k[0].startswith("logitwatch_user")]
    assert ("logitwatch_run_last_seen_timestamp_seconds", (run,)) in got


def test_silent_runs_drop_out(client, run_name):
    assert client.post(
        f"/api/v1/runs/{run_name}/points", content=_batch(), headers=MSGPACK
    ).is_success
    assert f'run="{run_name}"' in client.get("/metrics").text
    settings = client.app.state.settings
    old = datetime.now(UTC) - timedelta(seconds=settings.run_inactive_after_s + 60)
    with client.app.state.sessionmaker() as s, s.begin():
        s.execute(update(Run).where(Run.name == run_name).values(last_seen_at=old))
    assert f'run="{run_name}"' not in client.get("/metrics").text


def test_service_figures_and_promtool(client, run_name):
    assert client.post(
        f"/api/v1/runs/{run_name}/points", content=_batch(), headers=MSGPACK
    ).is_success
    client.get("/no/such/path")
    text = client.get("/metrics").text
    got = _samples(text)
    post = (("method", "POST"), ("route", "/api/v1/runs/{run}/points"), ("status", "200"))
    assert got[("logitwatch_http_requests_total", post)] == 1
    assert got[("logitwatch_http_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1  # fmt: skip
    assert got[("logitwatch_http_request_duration_seconds_count", post[:2])] == 1
    assert got[("logitwatch_db_seconds_count", (("operation", "insert"),))] >= 1
    assert got[("logitwatch_points_ingested_total", ())] == 9
    assert (
        got[("logitwatch_batch_points_count", ())],
        got[("logitwatch_batch_points_sum", ())],
    ) == (1, 9)
    # a resent batch is acknowledged, not stored again, and not counted again
    assert client.post(f"/api/v1/runs/{run_name}/points", content=_batch(), headers=MSGPACK).json()[
        "duplicate"
    ]
    again = _samples(client.get("/metrics").text)
    assert again[("logitwatch_points_ingested_total", ())] == 9
    promtool = shutil.which("promtool") or "promtool"  # scripts/setup.sh installs it
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_counters_sum_over_worker_processes(tmp_path):
    # `serve --workers 2` gives its workers one PROMETHEUS_MULTIPROC_DIR (prom.worker_metrics_dir)
    with live_server(f"sqlite:///{tmp_path / 'lw.db'}", workers=2) as server:
        # a fresh connection per request lets the kernel spread them over both workers
        for seq in range(8):
            with server.client() as c:
                r = c.post("/api/v1/runs/mp/points", content=_batch(seq), headers=MSGPACK)
                assert r.status_code == 200, r.text
        for _ in range(4):  # whichever worker answers, the totals are the same
            with server.client() as c:
                got = _samples(c.get("/metrics").text)
            post = (("method", "POST"), ("route", "/api/v1/runs/{run}/points"), ("status", "200"))
            assert got[("logitwatch_http_requests_total", post)] == 8
            assert got[("logitwatch_loss", (("run", "mp"),))] == 3.25


def test_worker_metrics_dir_is_fresh_and_removed(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with worker_metrics_dir(1) as path:
        assert path is None and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    with worker_metrics_dir(3) as path:
        assert path is not None and os.environ["PROMETHEUS_MULTIPROC_DIR"] == path
        assert Path(path).is_dir() and not any(Path(path).iterdir())
    assert not Path(path).exists() and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
