"""With auth on, every /api route wants a token of its scope (401 without, 403 with the wrong one),
run patterns fence runs off, /healthz stays open and /metrics is configurable."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest
from helpers.routes import routes_of
from helpers.server import live_server, thread_server

from logitwatch.cli import main
from logitwatch.protocol import Batch, encode_batch, series_from_columns
from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings
from logitwatch.service.store.tokens import create_token

MSGPACK = {"content-type": "application/msgpack"}
_PARAMS = {"run": "exp-1", "metric": "loss"}
#: For each required scope, a scope that must be refused.
_WEAKER = {"ingest": "read", "read": "ingest", "admin": "read"}


def _api_routes(app) -> list[tuple[str, str, str]]:
    out = []
    for method, template, scope in routes_of(app):
        if template.startswith("/api"):
            path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: _PARAMS.get(m.group(1), "1"), template)
            assert scope is not None, f"{template} has no require(scope) dependency"
            out.append((method, path, scope))
    return out


def _bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


@pytest.fixture
def auth_app(db_url):
    app = create_app(load_settings(db_url=db_url, auth=True))
    with app.state.sessionmaker() as s, s.begin():
        tokens = {
            scope: create_token(s, scope=scope).secret for scope in ("ingest", "read", "admin")
        }
        # the PostgreSQL database is shared by the test session: a pattern of this test's own
        pattern = f"exp{uuid.uuid4().hex[:8]}-*"
        tokens["exp-ingest"] = create_token(s, scope="ingest", run_pattern=pattern).secret
        tokens["exp-read"] = create_token(s, scope="read", run_pattern=pattern).secret
        tokens["pattern"] = pattern
    with thread_server(app) as server, server.client() as c:
        yield app, c, tokens


def test_every_api_route_needs_a_token_of_its_scope(auth_app):
    app, c, tokens = auth_app
    routes = _api_routes(app)
    assert {scope for _, _, scope in routes} == {"ingest", "read", "admin"}
    for method, path, scope in routes:
        r = c.request(method, path)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
        r = c.request(method, path, headers=_bearer(tokens["admin"] + "x"))
        assert r.status_code == 401, (method, path, "wrong token")
        r = c.request(method, path, headers=_bearer(tokens[_WEAKER[scope]]))
        assert r.status_code == 403, (method, path, scope, r.text)
        assert r.json()["error"] == "forbidden"
        for ok in (scope, "admin"):
            r = c.request(method, path, headers=_bearer(tokens[ok]))
            assert r.status_code not in (401, 403), (method, path, ok, r.text)


def test_run_patterns_fence_runs(auth_app):
    _, c, tokens = auth_app
    mine, other = tokens["pattern"].replace("*", "1"), f"prod-{uuid.uuid4().hex[:8]}"
    body = encode_batch(Batch("t", 0, 0, [series_from_columns("loss", {}, [1], [2.0])]))
    ingest = {**MSGPACK, **_bearer(tokens["exp-ingest"])}
    assert c.post(f"/api/v1/runs/{mine}/points", content=body, headers=ingest).status_code == 200
    r = c.post(f"/api/v1/runs/{other}/points", content=body, headers=ingest)
    assert r.status_code == 403 and other in r.json()["detail"]
    assert c.put(f"/api/v1/runs/{other}", headers=_bearer(tokens["admin"])).status_code == 201
    read = _bearer(tokens["exp-read"])
    assert [r["name"] for r in c.get("/api/v1/runs", headers=read).json()["runs"]] == [mine]
    everything = c.get("/api/v1/runs", headers=_bearer(tokens["read"])).json()["runs"]
    assert {mine, other} <= {r["name"] for r in everything}
    assert c.get(f"/api/v1/runs/{mine}/metrics/loss", headers=read).status_code == 200
    assert c.get(f"/api/v1/runs/{other}", headers=read).status_code == 403
    assert c.get("/api/v1/alerts", params={"run": other}, headers=read).status_code == 403


def test_health_is_open_and_metrics_open_by_default(auth_app):
    _, c, _ = auth_app
    assert c.get("/healthz").status_code == 200
    assert c.get("/metrics").status_code == 200


def test_metrics_auth_closes_metrics(db_url):
    app = create_app(load_settings(db_url=db_url, auth=True, metrics_auth=True))
    with app.state.sessionmaker() as s, s.begin():
        read = create_token(s, scope="read").secret
        ingest = create_token(s, scope="ingest").secret
    with thread_server(app) as server, server.client() as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=_bearer(ingest)).status_code == 403
        r = c.get("/metrics", headers=_bearer(read))
        assert r.status_code == 200 and "logitwatch_http_requests_total" in r.text
        assert c.get("/healthz").status_code == 200


def test_cli_token_against_a_live_server_and_never_logged(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'lw.db'}"
    argv = ["create", "--scope", "ingest", "--run", "exp-*", "--name", "ci", "--db", db]
    assert main(["token", *argv]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    assert secret.startswith("lw_") and secret not in out.err
    assert main(["token", "list", "--json", "--db", db]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["run_pattern"] == "exp-*" and secret not in json.dumps(listed)
    body = encode_batch(Batch("t", 0, 0, [series_from_columns("loss", {}, [1], [2.0])]))
    with live_server(db, args=("--auth",)) as server, server.client() as c:
        url = "/api/v1/runs/exp-1/points"
        assert c.post(url, content=body, headers=MSGPACK).status_code == 401
        ok = c.post(url, content=body, headers={**MSGPACK, **_bearer(secret)})
        assert ok.status_code == 200, ok.text
        bad = c.post(url, content=body, headers={**MSGPACK, **_bearer(secret + "x")})
        assert bad.status_code == 401
        assert main(["token", "revoke", str(listed["id"]), "--db", db]) == 0
        assert c.post(url, content=body, headers={**MSGPACK, **_bearer(secret)}).status_code == 401
    assert main(["token", "revoke", str(listed["id"]), "--db", db]) == 1  # already revoked
    assert secret not in server.log()


def test_auth_off_lets_everything_through(client):
    assert client.get("/api/v1/runs").status_code == 200
    assert isinstance(client, httpx.Client)
