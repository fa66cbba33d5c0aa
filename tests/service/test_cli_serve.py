"""`logitwatch serve` as a real process: migrates at start, prints the SQLite path, serves."""

from __future__ import annotations

import subprocess
import sys

from helpers.server import live_server

from logitwatch.protocol import Batch, encode_batch, series_from_columns


def test_serve_sqlite_default_location(tmp_path):
    home = tmp_path / "home"
    env = {"LOGITWATCH_HOME": str(home)}
    db = home / "logitwatch.db"
    # no --db: the documented default file under $LOGITWATCH_HOME
    with live_server(None, env=env) as server, server.client() as c:
        body = encode_batch(Batch("c", 1, 0, [series_from_columns("loss", {}, [1, 2], [3.0, 2.0])]))
        r = c.post(
            "/api/v1/runs/r/points", content=body, headers={"content-type": "application/msgpack"}
        )
        assert r.json()["accepted"] == 2
    assert f"SQLite file {db}" in server.log()
    assert db.exists()


def test_db_upgrade_and_bad_settings(tmp_path):
    db = tmp_path / "x.db"
    cmd = [sys.executable, "-m", "logitwatch", "db", "upgrade", "--db", f"sqlite:///{db}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "newest schema" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "logitwatch", "serve", "--db", "mysql://x/y"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "db_url" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "logitwatch", "serve"],
        capture_output=True,
        text=True,
        env={"LOGITWATCH_PORT": "http", "PATH": "/usr/bin"},
    )
    assert bad.returncode == 2 and "LOGITWATCH_PORT" in bad.stderr


def test_db_compact_and_stats(tmp_path):
    from logitwatch.service import store
    from logitwatch.service.store.db import make_engine, make_sessionmaker, upgrade

    url = f"sqlite:///{tmp_path}/c.db"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    for i in range(10):
        batch = Batch(
            "c", i, 0, [series_from_columns("loss", {}, range(i * 10, i * 10 + 10), [1.0] * 10)]
        )
        with sessions() as s:
            store.ingest_batch(s, run="r", batch=batch)
            s.commit()
    engine.dispose()
    cmd = [sys.executable, "-m", "logitwatch", "db"]
    out = subprocess.run([*cmd, "compact", "--db", url], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "merged 10 chunks" in out.stdout and "100 points in 1 chunks" in out.stdout
    out = subprocess.run([*cmd, "stats", "--db", url], capture_output=True, text=True)
    assert "bytes/point" in out.stdout


def test_two_workers_share_one_sqlite_file(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def batch(i):
        steps = range(i * 10, i * 10 + 10)
        series = [series_from_columns("loss", {}, steps, steps)]
        series += [series_from_columns("act.rms", {"layer": i % 4}, steps, steps)]
        return encode_batch(Batch(f"w{i % 2}", i, 0, series))

    with live_server(f"sqlite:///{tmp_path}/w.db", workers=2) as server:

        def send(i):
            r = httpx.post(
                f"{server.url}/api/v1/runs/r/points",
                content=batch(i),
                headers={"content-type": "application/msgpack"},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            return r.json()["duplicate"]

        with ThreadPoolExecutor(6) as pool:
            dups = list(pool.map(send, [*range(30), *range(0, 30, 3)]))
        assert dups.count(False) == 30
        with server.client() as c:
            loss = c.get("/api/v1/runs/r/metrics/loss").json()["series"][0]
            assert loss["steps"] == list(range(300))
            layers = c.get("/api/v1/runs/r/metrics/act.rms").json()["series"]
            assert sum(len(s["steps"]) for s in layers) == 300
