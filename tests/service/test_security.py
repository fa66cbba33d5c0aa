"""Security promises: tokens hashed at rest and never logged, constant-time comparison, CORS
off unless configured, loopback bind by default with a warning when binding wider without
auth, webhook targets http(s) only, request logs free of bearer tokens and payload values."""

from __future__ import annotations

import hmac
import sqlite3
import time

import httpx
import pytest
from helpers.server import live_server, thread_server

from logitwatch.cli import main
from logitwatch.protocol import Batch, encode_batch, series_from_columns
from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings
from logitwatch.service.store import tokens as tokens_mod
from logitwatch.service.store.db import upgrade

SECRET_VALUE = 98765.4321  # a payload value that must never reach a log
SECRET_LABEL = "zzsecretlabelzz"


def _db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'lw.db'}"
    upgrade(url)
    return url


def test_tokens_hashed_at_rest_and_never_logged_or_answered(tmp_path, capsys):
    url = _db(tmp_path)
    assert main(["token", "create", "--db", url, "--scope", "admin", "--name", "ci"]) == 0
    secret = next(w for w in capsys.readouterr().out.split() if w.startswith("lw_"))
    db_bytes = (tmp_path / "lw.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("lw.db-*")
    )
    assert secret.encode() not in db_bytes  # not the plaintext...
    with sqlite3.connect(tmp_path / "lw.db") as conn:
        (stored,) = conn.execute("SELECT token_hash FROM tokens").fetchone()
    assert stored == tokens_mod.hash_token(secret) and len(stored) == 64  # ...its SHA-256
    with live_server(url, args=("--auth", "--log-level", "debug")) as server:
        auth = {"authorization": f"Bearer {secret}"}
        body = encode_batch(Batch("c", 1, 0, [series_from_columns(
            "loss", {"tag": SECRET_LABEL}, [1], [SECRET_VALUE])]))  # fmt: skip
        with server.client() as c:
            r = c.post("/api/v1/runs/r1/points", content=body,
                       headers={**auth, "content-type": "application/msgpack"})  # fmt: skip
            assert r.status_code == 200
            assert c.get("/api/v1/runs/r1", headers=auth).status_code == 200
            bad = c.get("/api/v1/runs", headers={"authorization": "Bearer lw_wrong" + secret[8:]})
            assert bad.status_code == 401 and secret[8:] not in bad.text
            listed = c.get("/api/v1/runs", headers=auth).text
        assert main(["token", "list", "--db", url]) == 0
        assert secret not in capsys.readouterr().out + listed
        time.sleep(0.2)
    log = server.log()
    assert "serving on http://127.0.0.1" in log
    for leak in (secret, secret[3:20], str(SECRET_VALUE), SECRET_LABEL, "Bearer"):
        assert leak not in log, f"{leak!r} in the server log"


def test_token_comparison_is_constant_time(tmp_path, monkeypatch):
    url = _db(tmp_path)
    app = create_app(load_settings(db_url=url, auth=True))
    with app.state.sessionmaker() as s, s.begin():
        secret = tokens_mod.create_token(s, scope="read").secret
    calls = []
    compare = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(tokens_mod.hmac, "compare_digest", spy)
    with app.state.sessionmaker() as s:
        assert tokens_mod.authenticate(s, token=secret) is not None
        assert tokens_mod.authenticate(s, token="lw_" + "A" * 43) is None
    assert calls and all(a == tokens_mod.hash_token(secret) for a, _ in calls)


@pytest.mark.parametrize("origins", [[], ["https://dash.example"]])
def test_cors_is_off_unless_configured(tmp_path, origins):
    app = create_app(load_settings(db_url=_db(tmp_path), cors_origins=origins))
    with thread_server(app) as server, server.client() as c:
        for origin in ("https://evil.example", "https://dash.example"):
            pre = c.options("/api/v1/runs", headers={
                "origin": origin, "access-control-request-method": "GET"})  # fmt: skip
            got = c.get("/api/v1/runs", headers={"origin": origin})
            allowed = origin in origins
            for r in (pre, got):
                assert (r.headers.get("access-control-allow-origin") == origin) is allowed
                assert r.headers.get("access-control-allow-origin") != "*"


def test_binds_loopback_by_default_and_warns_when_wider_without_auth(tmp_path):
    assert load_settings(db_url="sqlite:///:memory:").host == "127.0.0.1"
    url = _db(tmp_path)
    with live_server(url) as server:
        assert "warning" not in server.log()
    with live_server(url, host="0.0.0.0") as wide:
        assert httpx.get(f"http://127.0.0.1:{wide.port}/healthz", timeout=5).status_code == 200
    assert "warning: listening on 0.0.0.0 without --auth" in wide.log()
    with live_server(url, host="0.0.0.0", args=("--auth",)) as wide_with_auth:
        pass
    assert "warning" not in wide_with_auth.log()


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/x", "gopher://x", "javascript:alert(1)", "x"]
)
def test_webhook_targets_are_http_or_https_only(url, tmp_path):
    with pytest.raises(ValueError, match="webhook_urls"):
        create_app(load_settings(db_url=f"sqlite:///{tmp_path / 'w.db'}", webhook_urls=[url]))
