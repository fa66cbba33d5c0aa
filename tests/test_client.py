"""logitwatch.client against a real service: quoted paths, the token, each read, errors."""

from __future__ import annotations

import math
import subprocess
import sys

import httpx
import pytest
from helpers.server import free_port, thread_server

from logitwatch.client import (
    ApiClient,
    NotReady,
    ServiceError,
    alert_path,
    alerts_path,
    auth_headers,
    metric_path,
    points_path,
    run_path,
    runs_path,
    series_path,
)
from logitwatch.protocol import Batch, encode_batch, series_from_columns
from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings
from logitwatch.service.store.db import upgrade
from logitwatch.service.store.tokens import create_token

RUN = "Exp-1.2_b"  # every character a valid run name may have


def _feed(url: str, run: str, headers: dict[str, str] | None = None) -> None:
    losses = [4 - i / 100 for i in range(99)] + [math.nan]
    series = [
        series_from_columns("loss", {}, range(100), losses, [1.7e9 + i for i in range(100)]),
        series_from_columns("attn.logit_max", {"layer": "0", "head": "0"}, [99], [12.5]),
        series_from_columns("attn.logit_max", {"layer": "1", "head": "0"}, [99], [40.0]),
    ]
    with httpx.Client(base_url=url, headers=headers or {}, timeout=30) as c:
        c.put(run_path(run), json={"tags": {"team": "a"}}).raise_for_status()
        c.post(
            points_path(run),
            content=encode_batch(Batch("t", 0, 0, series)),
            headers={"content-type": "application/msgpack"},
        ).raise_for_status()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('client') / 'lw.db'}"
    upgrade(db)
    with thread_server(create_app(load_settings(db_url=db))) as srv:
        _feed(srv.url, RUN)
        yield srv


@pytest.fixture
def api(server):
    with ApiClient(server.url + "/", timeout=30) as client:  # a trailing slash is fine
        yield client


def test_paths_quote_run_and_metric_names():
    assert runs_path() == "/api/v1/runs"
    assert run_path(RUN) == f"/api/v1/runs/{RUN}"  # valid names pass through unchanged
    assert points_path("r") == "/api/v1/runs/r/points"
    assert series_path("r") == "/api/v1/runs/r/series"
    assert metric_path("r", "attn.logit_max") == "/api/v1/runs/r/metrics/attn.logit_max"
    assert alerts_path() == "/api/v1/alerts" and alert_path(7) == "/api/v1/alerts/7"
    # anything else stays inside its segment: no extra path parts, query or fragment
    assert run_path("a b/c?d#e%") == "/api/v1/runs/a%20b%2Fc%3Fd%23e%25"
    assert metric_path("r", "x/y?z") == "/api/v1/runs/r/metrics/x%2Fy%3Fz"
    assert auth_headers("s3cret") == {"Authorization": "Bearer s3cret"}
    assert auth_headers(None) == {} and auth_headers("") == {}


def test_wait_ready_runs_and_run(api):
    assert api.wait_ready(timeout=10)["status"] == "ready"
    (run,) = api.runs()
    assert run["name"] == RUN and run["tags"] == {"team": "a"} and run["last_step"] == 99
    assert api.run(RUN)["n_series"] == 3


def test_series(api):
    assert len(api.series(RUN)) == 3
    (loss,) = api.series(RUN, metric="loss")
    assert (loss["n_points"], loss["last_step"], loss["last_value"]) == (100, 99, "NaN")


def test_metric_points_filters_buckets_and_pages(api):
    doc = api.metric(RUN, "loss")
    (s,) = doc["series"]
    assert (doc["run"], doc["metric"], doc["next_cursor"]) == (RUN, "loss", None)
    assert s["steps"] == list(range(100)) and s["values"][-1] == "NaN" and len(s["times"]) == 100
    # small pages are fetched one after another and merged
    (paged,) = api.metric(RUN, "loss", limit=30, times=False)["series"]
    assert paged["steps"] == s["steps"] and paged["values"] == s["values"]
    assert not paged.get("times")  # times=False leaves them out
    (layer1,) = api.metric(RUN, "attn.logit_max", labels={"layer": "1", "head": None})["series"]
    assert layer1["labels"] == {"layer": "1", "head": "0"} and layer1["values"] == [40.0]
    (b,) = api.metric(RUN, "loss", max_points=10)["series"]
    assert len(b["steps"]) == 10 and b["nan"][-1] == 1 and b["max"][0] == 4.0
    (part,) = api.metric(RUN, "loss", start=98, end=98)["series"]
    assert part["steps"] == [98]


def test_alerts(api):
    # the NaN loss at step 99 fires the built-in non-finite rule
    alerts = api.alerts(run=RUN)
    assert [(a["rule"], a["metric"], a["state"]) for a in alerts] == [
        ("nonfinite", "loss", "firing")
    ]
    assert api.alerts(state="resolved") == []
    assert api.alerts(run="other-run", limit=10) == []


def test_unknown_run_is_a_clear_error(api):
    with pytest.raises(ServiceError) as err:
        api.series("no-such-run")
    assert err.value.status == 404 and err.value.path == "/api/v1/runs/no-such-run/series"
    assert str(err.value) == (
        "404 from /api/v1/runs/no-such-run/series: run 'no-such-run' does not exist"
    )
    with pytest.raises(ServiceError, match="404 from /api/v1/runs/no-such-run: run 'no-such-run'"):
        api.run("no-such-run")


def test_awkward_run_names_reach_the_service_as_one_name(api):
    # Unquoted, '?' would start a query string and '#' a fragment; quoted, the service sees
    # the whole name in the path and refuses it by name (422), not as an unknown route.
    for name in ("a?b", "a b#c", "50%", "-x"):
        with pytest.raises(ServiceError) as err:
            api.series(name)
        assert err.value.status == 422 and "path.run" in str(err.value), name
    with pytest.raises(ServiceError) as err:
        api.metric(RUN, "Loss?x=1")
    assert err.value.status == 422 and "path.metric" in str(err.value)


def test_unreachable_service(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with ApiClient(dead, timeout=2) as api:
        with pytest.raises(ServiceError) as err:
            api.runs()
        assert err.value.status is None and str(err.value).startswith(
            f"cannot reach the service at {dead} ("
        )
        with pytest.raises(NotReady, match="did not become ready in 0 s"):
            api.wait_ready(timeout=0.2, interval=0.05)
        exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        exited.wait()
        with pytest.raises(NotReady, match="the service exited with status 3"):
            api.wait_ready(timeout=10, process=exited)


def test_token_is_sent(tmp_path):
    db = f"sqlite:///{tmp_path / 'lw.db'}"
    upgrade(db)
    app = create_app(load_settings(db_url=db, auth=True))
    with app.state.sessionmaker() as s, s.begin():
        admin = create_token(s, scope="admin").secret
        read = create_token(s, scope="read").secret
    with thread_server(app) as srv:
        _feed(srv.url, RUN, auth_headers(admin))
        with ApiClient(srv.url) as anonymous, pytest.raises(ServiceError) as err:
            anonymous.runs()
        assert err.value.status == 401 and str(err.value).startswith("401 from /api/v1/runs: ")
        with ApiClient(srv.url, token=read) as api:
            assert [r["name"] for r in api.runs()] == [RUN]
            assert api.alerts(run=RUN)[0]["rule"] == "nonfinite"
        # a caller's own httpx.Client carries the token too, and stays open
        with httpx.Client(timeout=10) as own:
            with ApiClient(srv.url, token=read, client=own) as api:
                assert len(api.series(RUN)) == 3
            assert not own.is_closed


def test_import_pulls_no_heavy_dependencies():
    code = "import sys, logitwatch.client; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    mods = {m.split(".")[0] for m in out.stdout.split()}
    assert not mods & {"torch", "fastapi", "sqlalchemy", "numpy", "starlette", "uvicorn"}
