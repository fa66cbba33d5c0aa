"""`logitwatch runs|series|query|alerts` against a real server: tables, --json, one-line errors."""

from __future__ import annotations

import json
import math

import pytest
from helpers.server import free_port, thread_server

from logitwatch.cli import main
from logitwatch.protocol import Batch, encode_batch, series_from_columns
from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings
from logitwatch.service.store.db import upgrade
from logitwatch.service.store.tokens import create_token


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('cli') / 'lw.db'}"
    upgrade(db)
    app = create_app(load_settings(db_url=db))
    series = [
        series_from_columns("loss", {}, range(100), [4 - i / 100 for i in range(99)] + [math.nan]),
        series_from_columns("attn.logit_max", {"layer": "0", "head": "0"}, [99], [12.5]),
        series_from_columns("attn.logit_max", {"layer": "1", "head": "0"}, [99], [40.0]),
    ]
    with thread_server(app) as srv, srv.client() as c:
        c.put("/api/v1/runs/cli-run", json={"tags": {"team": "a"}}).raise_for_status()
        body = encode_batch(Batch("t", 0, 0, series))
        r = c.post(
            "/api/v1/runs/cli-run/points",
            content=body,
            headers={"content-type": "application/msgpack"},
        )
        r.raise_for_status()
        yield srv


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at the terminal width


def test_runs_and_series(server, capsys):
    code, out, _ = _run(capsys, "runs", "--server", server.url)
    assert code == 0 and "cli-run" in out and "team" in out
    code, out, _ = _run(capsys, "runs", "--server", server.url, "--json")
    assert [r["name"] for r in json.loads(out)["runs"]] == ["cli-run"]
    code, out, _ = _run(capsys, "series", "cli-run", "--server", server.url)
    assert code == 0 and "head=0,layer=1" in out and "attn.logit_max" in out
    code, out, _ = _run(
        capsys, "series", "cli-run", "--metric", "loss", "--json", "--server", server.url
    )
    (loss,) = json.loads(out)["series"]
    assert (loss["n_points"], loss["last_step"], loss["last_value"]) == (100, 99, "NaN")


def test_query_points_buckets_and_filters(server, capsys, monkeypatch):
    monkeypatch.setenv("LOGITWATCH_SERVER", server.url)
    code, out, _ = _run(capsys, "query", "cli-run", "loss", "--json")
    (s,) = json.loads(out)["series"]
    assert s["steps"] == list(range(100)) and s["values"][-1] == "NaN"
    code, out, _ = _run(capsys, "query", "cli-run", "loss", "--max-points", "10", "--json")
    (b,) = json.loads(out)["series"]
    assert len(b["steps"]) == 10 and b["nan"][-1] == 1 and b["max"][0] == 4.0
    code, out, _ = _run(capsys, "query", "cli-run", "loss", "--max-points", "4")
    assert code == 0 and "first step" in out and "NaN" in out
    code, out, _ = _run(capsys, "query", "cli-run", "attn.logit_max", "--layer", "1", "--json")
    (s,) = json.loads(out)["series"]
    assert s["labels"] == {"layer": "1", "head": "0"} and s["values"] == [40.0]
    code, out, _ = _run(capsys, "query", "cli-run", "loss", "--start", "98", "--end", "98")
    assert code == 0 and "3.02" in out


def test_alerts_table(server, capsys):
    # the NaN loss at step 99 fires the built-in non-finite rule
    code, out, _ = _run(capsys, "alerts", "--server", server.url, "--run", "cli-run", "--json")
    alerts = json.loads(out)["alerts"]
    assert code == 0 and [(a["rule"], a["metric"], a["state"]) for a in alerts] == [
        ("nonfinite", "loss", "firing")
    ]
    assert alerts[0]["fired_step"] == 99
    code, out, _ = _run(capsys, "alerts", "--server", server.url, "--state", "firing")
    assert code == 0 and "nonfinite" in out and "cli-run" in out
    names = next(line.split() for line in out.splitlines() if line.split()[:1] == ["id"])
    row = next(line.split() for line in out.splitlines() if "nonfinite" in line)
    assert row[names.index("fired")] == "99" and row[names.index("last")] == "99"
    code, out, _ = _run(capsys, "alerts", "--server", server.url, "--state", "resolved")
    assert code == 0 and "nonfinite" not in out


def test_errors_are_one_line(server, capsys):
    code, out, err = _run(capsys, "series", "no-such-run", "--server", server.url)
    assert code == 1 and "404" in out + err and "no-such-run" in out + err
    assert "Traceback" not in out + err
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = _run(capsys, "runs", "--server", dead)
    assert code == 1 and "cannot reach" in out + err and len((out + err).strip().splitlines()) == 1


def test_token_is_sent(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'lw.db'}"
    upgrade(db)
    app = create_app(load_settings(db_url=db, auth=True))
    with app.state.sessionmaker() as s, s.begin():
        secret = create_token(s, scope="read").secret
    with thread_server(app) as srv:
        code, out, err = _run(capsys, "runs", "--server", srv.url)
        assert code == 1 and "401" in out + err
        code, out, _ = _run(capsys, "runs", "--server", srv.url, "--token", secret, "--json")
        assert code == 0 and json.loads(out) == {"runs": []}
