"""Limits over HTTP: body size -> 413, series per run -> 422 naming the limit; nothing stored."""

from __future__ import annotations

import httpx
import pytest
from helpers.server import thread_server

from logitwatch.protocol import Batch, encode_batch, series_from_columns
from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings


@pytest.fixture
def small(db_url):
    app = create_app(load_settings(db_url=db_url, body_limit_bytes=4096, max_series_per_run=3))
    with thread_server(app) as server, server.client() as c:
        yield c


def post(client, run, batch):
    return client.post(
        f"/api/v1/runs/{run}/points",
        content=encode_batch(batch),
        headers={"content-type": "application/msgpack"},
    )


def test_body_limit(small, run_name):
    big = Batch("c", 1, 0, [series_from_columns("loss", {}, range(1000), [1.0] * 1000)])
    r = post(small, run_name, big)
    assert r.status_code == 413 and "body_limit_bytes=4096" in r.json()["detail"]

    def chunked():  # no Content-Length: counted while streaming
        yield encode_batch(big)

    r = small.post(
        f"/api/v1/runs/{run_name}/points",
        content=chunked(),
        headers={"content-type": "application/msgpack"},
    )
    assert r.status_code == 413
    assert small.get(f"/api/v1/runs/{run_name}").status_code == 404
    r = small.put(f"/api/v1/runs/{run_name}", json={"config": {"x": "y" * 5000}})
    assert r.status_code == 413 and r.json()["error"] == "too_large"


def test_series_limit_names_the_limit_and_stores_nothing(small, run_name):
    ok = Batch("c", 1, 0, [series_from_columns(f"m{i}", {}, [1], [1.0]) for i in range(2)])
    assert post(small, run_name, ok).status_code == 200
    too_many = Batch("c", 2, 0, [series_from_columns(f"n{i}", {}, [1], [1.0]) for i in range(2)])
    r = post(small, run_name, too_many)
    assert r.status_code == 422
    assert r.json()["error"] == "limit"
    assert "max_series_per_run=3" in r.json()["detail"][0]["message"]
    names = [s["metric"] for s in small.get(f"/api/v1/runs/{run_name}/series").json()["series"]]
    assert names == ["m0", "m1"]
    # the rejected batch's (client, seq) was not recorded either: a fixed resend is stored
    fixed = Batch("c", 2, 0, [series_from_columns("m0", {}, [2], [2.0])])
    assert post(small, run_name, fixed).json()["duplicate"] is False


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v1/runs/bad run!/series", "path.run"),
        ("/api/v1/runs/ok/metrics/Not.Valid", "path.metric"),
        ("/api/v1/runs/ok/metrics/loss?Bad-Label=1", "query.Bad-Label"),
        ("/api/v1/runs/ok/metrics/loss?segments=some", "query.segments"),
    ],
)
def test_bad_names_are_422_with_the_field(small, path, field):
    r = small.get(path)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["field"] == field


def test_json_spelling_of_series_last_value(small, run_name):
    body = {
        "client": "c",
        "seq": 1,
        "series": [{"metric": "loss", "steps": [1, 2], "values": [1, "NaN"], "times": []}],
    }
    assert small.post(f"/api/v1/runs/{run_name}/points", json=body).status_code == 200
    (s,) = small.get(f"/api/v1/runs/{run_name}/series").json()["series"]
    assert s["last_value"] == "NaN" and s["n_points"] == 2
    raw = httpx.get(f"{small.base_url}/api/v1/runs/{run_name}/metrics/loss").text
    assert '"values":[1.0, "NaN"]' in raw


def test_database_down_is_503_with_retry_after():
    settings = load_settings(db_url="postgresql+psycopg://postgres@127.0.0.1:5432/lw_no_such_db")
    with thread_server(create_app(settings)) as server, server.client() as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        batch = Batch("c", 1, 0, [series_from_columns("loss", {}, [1], [1.0])])
        r = post(c, "r", batch)
        assert r.status_code == 503 and r.json()["error"] == "unavailable"
        assert r.headers["retry-after"] == "1"
