"""Debian's Prometheus scrapes a live `logitwatch serve` and serves a run's gauge back over its API."""

from __future__ import annotations

import time

from helpers.prometheus import prom_get, prometheus
from helpers.server import live_server

from logitwatch.protocol import Batch, encode_batch, series_from_columns


def _config(target_port: int) -> dict:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {
                "job_name": "logitwatch",
                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
            }
        ],
    }


def _query(url: str, promql: str) -> list[dict]:
    return prom_get(url, "query", query=promql)["result"]


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
        with prometheus(_config(server.port), tmp_path) as prom:
            deadline = time.monotonic() + 45
            loss = logits = []
            while time.monotonic() < deadline and not (loss and logits):  # until it has scraped
                time.sleep(0.5)
                loss = _query(prom.url, 'logitwatch_loss{run="prom-e2e"}')
                logits = _query(prom.url, 'logitwatch_attn_logit_max{run="prom-e2e"}')
            log = prom.log()
            assert loss, f"Prometheus never saw logitwatch_loss; its log:\n{log[-3000:]}"
            assert float(loss[0]["value"][1]) == 3.125
            # per-head series fold into one gauge per layer: the max over heads
            assert [(m["metric"]["layer"], float(m["value"][1])) for m in logits] == [("2", 120.5)]
            assert "head" not in logits[0]["metric"]
            up = _query(prom.url, 'up{job="logitwatch"}')
            assert up and up[0]["value"][1] == "1"
