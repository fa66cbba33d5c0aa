"""``fired_step`` in the ingest answer over a real server, and dashboard links at that step."""

from __future__ import annotations

import httpx

from logitwatch.protocol import Batch, encode_batch, series_from_columns

GRAFANA = "http://grafana.example:3000"  # the ``linked`` fixture's (conftest.py)


def post(c: httpx.Client, run: str, seq: int, steps: list[int], values: list[float]) -> list:
    series = series_from_columns("attn.logit_max", {"layer": "2", "head": "0"}, steps, values)
    r = c.post(
        f"/api/v1/runs/{run}/points",
        content=encode_batch(Batch("c", seq, 0, [series])),
        headers={"content-type": "application/msgpack"},
    )
    assert r.status_code == 200, r.text
    return r.json()["alerts"]


def test_the_ingest_answer_says_when_each_alert_fired(linked, run_name):
    # above 100 at step 500 (pending: attn-logit-high wants two points), firing at step 600
    assert post(linked, run_name, 1, [400, 500], [50.0, 150.0]) == []
    (a,) = post(linked, run_name, 2, [600], [170.0])
    assert (a["rule"], a["state"], a["first_step"], a["fired_step"]) == (
        "attn-logit-high", "firing", 500, 600,
    )  # fmt: skip
    assert a["dashboard"].endswith("&var-step_min=400&var-step_max=800")  # zoomed on step 600
    (listed,) = linked.get("/api/v1/alerts", params={"run": run_name}).json()["alerts"]
    assert (listed["fired_step"], listed["dashboard"]) == (600, a["dashboard"])
    # later points keep the step it fired at
    (again,) = post(linked, run_name, 3, [700], [180.0])
    assert (again["fired_step"], again["last_step"]) == (600, 700)
