"""Alerts carry a link to the run dashboard at their step: REST, the ingest answer, webhooks."""

from __future__ import annotations

import math

from logitwatch.protocol import Batch, encode_batch, series_from_columns
from logitwatch.service.rules.notify import render_payload

GRAFANA = "http://grafana.example:3000"  # the ``linked`` fixture's (conftest.py)


def test_rest_and_ingest_alerts_link_to_the_dashboard_at_their_step(linked, run_name):
    batch = Batch("c", 1, 0, [series_from_columns("loss", {}, [400, 401], [3.0, math.nan])])
    r = linked.post(
        f"/api/v1/runs/{run_name}/points",
        content=encode_batch(batch),
        headers={"content-type": "application/msgpack"},
    )
    (answer,) = r.json()["alerts"]
    want = (
        f"{GRAFANA}/d/logitwatch-run/run-deep-dive?var-run={run_name}"
        "&var-step_min=201&var-step_max=601"
    )
    assert answer["dashboard"] == want
    (listed,) = linked.get("/api/v1/alerts", params={"run": run_name}).json()["alerts"]
    assert listed["dashboard"] == want
    assert linked.get(f"/api/v1/alerts/{listed['id']}").json()["dashboard"] == want


def test_webhook_payloads_carry_the_link():
    alert = {"run": "r", "rule": "nonfinite", "severity": "critical", "metric": "loss",
             "labels": {}, "first_step": 10, "last_step": 10, "value": "NaN",
             "threshold": None, "hint": "restart"}  # fmt: skip
    link = f"{GRAFANA}/d/logitwatch-run/run-deep-dive?var-run=r&var-step_min=0&var-step_max=210"
    assert render_payload("json", alert, "firing", GRAFANA)["dashboard_url"] == link
    slack = render_payload("slack", alert, "firing", GRAFANA)
    assert link in slack["blocks"][0]["text"]["text"]
    assert render_payload("json", alert, "firing", None)["dashboard_url"] is None
