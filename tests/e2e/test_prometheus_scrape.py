"""Debian's Prometheus scrapes a live `logitwatch serve` and serves a run's gauge back over its API."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
from helpers.server import free_port, live_server

from logitwatch.protocol import Batch, encode_batch, series_from_columns

# scripts/setup.sh installs Debian's prometheus; without it this test fails, it does not skip.
PROMETHEUS = shutil.which("prometheus") or "prometheus"


def _start_prometheus(tmp: Path, target_port: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: logitwatch\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
    )
    with open(tmp / "prometheus.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}"


def _query(url: str, promql: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_prometheus_scrapes_run_gauges(tmp_path):
    batch = Batch(
        "trainer",
        0,
        0,
        [
            series_from_columns("loss", {}, [10, 11], [3.25, 3.125]),
            series_from_columns("attn.logit_max", {"layer": "2", "head": "0"}, [11], [40.0]),
            series_from_columns("attn.logit_max", {"layer": "2", "head": "5"}, [11], [120.5]),
        ],
    )
    with live_server(f"sqlite:///{tmp_path / 'lw.db'}") as server, server.client() as c:
        r = c.post(
            "/api/v1/runs/prom-e2e/points",
            content=encode_batch(batch),
            headers={"content-type": "application/msgpack"},
        )
        assert r.status_code == 200, r.text
        proc, prom = _start_prometheus(tmp_path, server.port)
        try:
            deadline = time.monotonic() + 45
            loss = logits = []
            while time.monotonic() < deadline and not (loss and logits):
                time.sleep(0.5)
                try:
                    loss = _query(prom, 'logitwatch_loss{run="prom-e2e"}')
                    logits = _query(prom, 'logitwatch_attn_logit_max{run="prom-e2e"}')
                except httpx.HTTPError:
                    continue  # Prometheus is still starting
            log = (tmp_path / "prometheus.log").read_text(errors="replace")
            assert loss, f"Prometheus never saw logitwatch_loss; its log:\n{log[-3000:]}"
            assert float(loss[0]["value"][1]) == 3.125
            # per-head series fold into one gauge per layer: the max over heads
            assert [(m["metric"]["layer"], float(m["value"][1])) for m in logits] == [("2", 120.5)]
            assert "head" not in logits[0]["metric"]
            up = _query(prom, 'up{job="logitwatch"}')
            assert up and up[0]["value"][1] == "1"
        finally:
            proc.terminate()
            proc.wait(15)
