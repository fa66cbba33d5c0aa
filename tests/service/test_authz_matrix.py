"""The authorization matrix: every route of the app (read from app.routes, so new routes are
covered) x {no token, wrong scope, token for another run pattern, right token} -> the expected
status. Open routes (health, docs, schema, /metrics by default) answer everyone."""

from __future__ import annotations

import re

import pytest
from helpers.routes import routes_of
from helpers.server import thread_server

from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings
from logitwatch.service.store.db import upgrade
from logitwatch.service.store.tokens import create_token

RUN = "exp-1"
_PARAMS = {"run": RUN, "metric": "loss"}
_WRONG = {"ingest": "read", "read": "ingest", "admin": "read"}
_BODIES = {
    ("PUT", "/api/v1/runs/{run}"): {"config": {}, "tags": {}},
    ("POST", "/api/v1/runs/{run}/points"): {"client": "c", "seq": 1, "series": []},
}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    db_url = f"sqlite:///{tmp_path_factory.mktemp('authz') / 'lw.db'}"
    upgrade(db_url)
    app = create_app(load_settings(db_url=db_url, auth=True))
    tokens = {}
    with app.state.sessionmaker() as s, s.begin():
        for scope in ("ingest", "read", "admin"):
            tokens[scope] = create_token(s, scope=scope, run_pattern="exp-*").secret
            tokens[f"{scope}-other"] = create_token(s, scope=scope, run_pattern="other-*").secret
    with thread_server(app) as server, server.client() as c:
        c.put(
            f"/api/v1/runs/{RUN}", json={}, headers={"authorization": f"Bearer {tokens['admin']}"}
        )
        yield app, c, tokens


def _call(c, method: str, template: str, token: str | None):
    path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: _PARAMS.get(m.group(1), "1"), template)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    body = _BODIES.get((method, template))
    kwargs = {"json": body} if body is not None else {}
    if method in ("POST", "PUT", "PATCH") and body is None:
        kwargs = {"json": {}}
    return c.request(method, path, headers=headers, **kwargs)


def test_every_route_answers_the_matrix(matrix):
    app, c, tokens = matrix
    routes = routes_of(app)
    assert len([r for r in routes if r[2]]) >= 15  # the API is all there
    wrong = []
    for method, template, scope in routes:
        has_run = "{run}" in template
        if scope is None:  # open: nobody is refused
            for token in (None, "lw_" + "x" * 43, tokens["read"]):
                status = _call(c, method, template, token).status_code
                if status in (401, 403) or status >= 500:
                    wrong.append(f"{method} {template} open route gave {status}")
            continue
        expect = {
            "no token": (None, {401}),
            "unknown token": ("lw_" + "x" * 43, {401}),
            "wrong scope": (tokens[_WRONG[scope]], {403}),
            "other run": (tokens[f"{scope}-other"], {403} if has_run else None),
            "right token": (tokens[scope], None),
        }
        for case, (token, statuses) in expect.items():
            status = _call(c, method, template, token).status_code
            ok = status in statuses if statuses else status not in (401, 403) and status < 500
            if not ok:
                wrong.append(f"{method} {template} [{scope}] {case}: {status}")
    assert not wrong, "\n".join(wrong)


def test_admin_reaches_everything_and_list_routes_filter_runs(matrix):
    _, c, tokens = matrix
    other = {"authorization": f"Bearer {tokens['read-other']}"}
    assert c.get("/api/v1/runs", headers=other).json()["runs"] == []
    mine = {"authorization": f"Bearer {tokens['read']}"}
    assert [r["name"] for r in c.get("/api/v1/runs", headers=mine).json()["runs"]] == [RUN]
    assert c.get(f"/api/v1/alerts?run={RUN}", headers=other).status_code == 403
    bad = {"authorization": "Basic dXNlcjpwYXNz"}
    assert c.get("/api/v1/runs", headers=bad).status_code == 401
