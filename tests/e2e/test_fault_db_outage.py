"""The database goes away under a running service and comes back: 503 + Retry-After meanwhile,
/readyz tells the truth, the agent spools, and afterwards every point is stored exactly once.

The database is a private PostgreSQL cluster in a temp dir on a free port (never the shared one).
"""

from __future__ import annotations

import time

import httpx
from helpers.answers import json_of
from helpers.pgcluster import pg_cluster
from helpers.server import live_server

from logitwatch.agent.transport.sender import HttpSink, SenderConfig
from logitwatch.agent.transport.sink import FanOutSink, MemorySink, series_key

RUN = "db-outage"
KEYS = [series_key("loss"), *(series_key("grad.norm", layer=i) for i in range(4))]


def _log(sink, step: int) -> None:
    sink.log(step, {k: step * 0.5 + i + 0.125 for i, k in enumerate(KEYS)})


def _wait(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _stored(c: httpx.Client) -> dict:
    out = {}
    for metric in ("loss", "grad.norm"):
        body = json_of(c.get(f"/api/v1/runs/{RUN}/metrics/{metric}", params={"limit": 100_000}))
        for e in body["series"]:
            out[series_key(metric, **e["labels"])] = (e["steps"], e["values"])
    return out


def test_database_outage_503_then_nothing_lost(tmp_path):
    record = MemorySink()
    cfg = SenderConfig(batch_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.3)
    with pg_cluster() as pg, live_server(pg.url) as server, server.client() as c:
        http = HttpSink(server.url, RUN, spool_dir=tmp_path / "spool", config=cfg)
        sink = FanOutSink([http, record])
        sink.register_run(RUN, config={"test": "db-outage"})
        for step in range(20):
            _log(sink, step)
        assert http.flush(30) and not http.offline

        pg.stop("fast")  # the database goes away under the running service
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        assert c.get("/healthz").status_code == 200  # the process itself is alive
        for path in (f"/api/v1/runs/{RUN}", f"/api/v1/runs/{RUN}/series", "/api/v1/runs"):
            r = c.get(path)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.headers["Retry-After"] and r.json()["error"] == "unavailable"
        for step in range(20, 45):  # training goes on: the agent backs off and spools
            _log(sink, step)
            time.sleep(0.01)
        assert _wait(lambda: http.offline and http.spool.pending() > 0), "agent never spooled"
        assert c.get("/readyz").status_code == 503  # still the truth while it is down

        pg.start()
        assert _wait(lambda: c.get("/readyz").status_code == 200), "/readyz never recovered"
        for step in range(45, 60):
            _log(sink, step)
        assert http.flush(30)
        assert _wait(lambda: http.spool.pending() == 0 and not http.offline), server.log()
        sink.close(30)
        stored = _stored(c)

    keys = record.keys()  # MemorySink: the series it saw
    produced = {k: record.series(k[0], **dict(k[1])) for k in keys}
    assert set(stored) == set(produced) and len(produced) == len(KEYS)
    for key, (steps, values) in produced.items():
        assert stored[key] == (steps, values), key  # every point once, bit for bit
    assert sum(len(s) for s, _ in stored.values()) == 60 * len(KEYS)
