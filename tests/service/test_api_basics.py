"""The HTTP API end to end on a real uvicorn: runs, ingest, reads, errors, on SQLite and PostgreSQL."""

from __future__ import annotations

import math

import msgpack
import numpy as np

from logitwatch.protocol import Batch, encode_batch, series_from_columns

MSGPACK = {"content-type": "application/msgpack"}


def post(client, run, batch, fmt="msgpack"):
    ctype = "application/msgpack" if fmt == "msgpack" else "application/json"
    return client.post(
        f"/api/v1/runs/{run}/points",
        content=encode_batch(batch, fmt=fmt),
        headers={"content-type": ctype},
    )


def test_health_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/runs/{run}/points" in paths and "/api/v1/runs/{run}/metrics/{metric}" in paths


def test_put_run_is_idempotent(client, run_name):
    r = client.put(f"/api/v1/runs/{run_name}", json={"config": {"d_model": 64}, "tags": {"a": "b"}})
    assert r.status_code == 201
    assert r.json()["max_segment"] == -1 and r.json()["last_step"] is None
    r = client.put(f"/api/v1/runs/{run_name}", json={"tags": {"a": "c"}})
    assert r.status_code == 200
    body = client.get(f"/api/v1/runs/{run_name}").json()
    assert body["config"] == {"d_model": 64} and body["tags"] == {"a": "c"}
    assert run_name in [r["name"] for r in client.get("/api/v1/runs").json()["runs"]]


def test_nonfinite_round_trip_in_json_and_msgpack(client, run_name):
    values = [1.5, math.nan, math.inf, -math.inf, -0.0, 1e308]
    for fmt, seq in (("msgpack", 1), ("json", 2)):
        batch = Batch("c", seq, 0, [series_from_columns(f"v.{fmt}", {}, range(6), values)])
        assert post(client, run_name, batch, fmt).json()["accepted"] == 6
        got = client.get(f"/api/v1/runs/{run_name}/metrics/v.{fmt}").json()["series"][0]
        assert got["values"] == [1.5, "NaN", "Infinity", "-Infinity", -0.0, 1e308]
        packed = client.get(
            f"/api/v1/runs/{run_name}/metrics/v.{fmt}", headers={"accept": "application/msgpack"}
        )
        series = msgpack.unpackb(packed.content)["series"][0]
        back = np.frombuffer(series["values"], dtype="<f8")
        assert back.tobytes() == np.array(values).tobytes()  # bit for bit, NaN included


def test_resent_batch_is_stored_once(client, run_name):
    batch = Batch("agent-1", 7, 0, [series_from_columns("loss", {}, range(100), range(100))])
    first, again = post(client, run_name, batch).json(), post(client, run_name, batch).json()
    assert (first["accepted"], first["duplicate"]) == (100, False)
    assert isinstance(first["alerts"], list)  # the run's firing alerts (rules issue)
    assert (again["accepted"], again["duplicate"]) == (100, True)
    series = client.get(f"/api/v1/runs/{run_name}/series").json()["series"]
    assert series[0]["n_points"] == 100 and series[0]["last_value"] == 99.0


def test_bad_input_statuses(client, run_name):
    r = client.post(f"/api/v1/runs/{run_name}/points", content=b"\xc1\xc1", headers=MSGPACK)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    r = client.post(
        f"/api/v1/runs/{run_name}/points",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    bad = {
        "client": "c",
        "seq": 1,
        "series": [{"metric": "loss", "labels": {"Bad Key": "x"}, "steps": [1], "values": [1]}],
    }
    r = client.post(f"/api/v1/runs/{run_name}/points", json=bad)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "series[0].labels"
    assert client.get("/api/v1/runs/no-such-run").status_code == 404
    assert client.get("/api/v1/runs/no-such-run/metrics/loss").json()["error"] == "not_found"
    r = client.get(f"/api/v1/runs/{run_name}/metrics/loss?max_points=0")
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "query.max_points"
    # nothing of the rejected batches was stored, not even the run
    assert client.get(f"/api/v1/runs/{run_name}").status_code == 404


def test_segments_buckets_and_pages_over_http(client, run_name):
    first = Batch("c", 1, 0, [series_from_columns("loss", {}, range(100), [0.0] * 100)])
    resumed = Batch("c", 2, 1, [series_from_columns("loss", {}, range(80, 120), [1.0] * 40)])
    post(client, run_name, first)
    post(client, run_name, resumed)
    run = client.get(f"/api/v1/runs/{run_name}").json()
    assert (run["max_segment"], run["last_step"]) == (1, 119)
    url = f"/api/v1/runs/{run_name}/metrics/loss"
    (newest,) = client.get(url).json()["series"]
    assert newest["segment"] is None and newest["values"] == [0.0] * 80 + [1.0] * 40
    every = client.get(url, params={"segments": "all"}).json()["series"]
    assert [(s["segment"], len(s["steps"])) for s in every] == [(0, 100), (1, 40)]
    (b,) = client.get(url, params={"max_points": 4}).json()["series"]
    assert b["steps"] == [0, 30, 60, 90] and b["max"] == [0.0, 0.0, 1.0, 1.0]
    assert b["count"] == [30, 30, 30, 30] and b["nan"] == [0, 0, 0, 0]
    packed = client.get(url, params={"max_points": 4}, headers={"accept": "application/msgpack"})
    doc = msgpack.unpackb(packed.content)
    assert np.frombuffer(doc["series"][0]["last"], "<f8").tolist() == [0.0, 0.0, 1.0, 1.0]
    page = client.get(url, params={"limit": 50}).json()
    rest = client.get(url, params={"limit": 500, "cursor": page["next_cursor"]}).json()
    assert page["series"][0]["steps"] + rest["series"][0]["steps"] == list(range(120))
    assert rest["next_cursor"] is None
