"""Webhook receivers that hang or answer 500, behind a real ``logitwatch serve``: the alert still
fires and resolves on time (in the ingest answers themselves), and the deliveries are retried
and recorded. (tests/service/test_notify.py covers the notifier's retry schedule in detail.)"""

from __future__ import annotations

import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from helpers.answers import json_of
from helpers.server import live_server

from logitwatch.protocol import Batch, encode_batch, series_from_columns

MSGPACK = {"content-type": "application/msgpack"}


def _receiver(mode: str, hits: list, release: threading.Event) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            hits.append(mode)
            if mode == "hang":
                release.wait(30)
            try:
                self.send_response(500)
                self.end_headers()
            except OSError:
                pass  # the service gave up waiting

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _post(c, seq: int, step: int, loss: float) -> list[dict]:
    batch = Batch("c", seq, 0, [series_from_columns("loss", {}, [step], [loss])])
    r = c.post("/api/v1/runs/hooks/points", content=encode_batch(batch), headers=MSGPACK)
    return [a for a in json_of(r)["alerts"] if a["rule"] == "nonfinite"]


def test_hanging_and_failing_receivers_do_not_delay_alerts(tmp_path):
    hits: list[str] = []
    release = threading.Event()
    hang, fail = _receiver("hang", hits, release), _receiver("fail", hits, release)
    urls = [f"http://127.0.0.1:{s.server_address[1]}/hook" for s in (hang, fail)]
    db = tmp_path / "lw.db"
    try:
        with live_server(
            f"sqlite:///{db}", env={"LOGITWATCH_WEBHOOK_URLS": ",".join(urls)}
        ) as server:
            with server.client() as c:
                assert _post(c, 1, 0, 2.5) == []
                t0 = time.monotonic()
                fired = _post(c, 2, 1, float("nan"))  # fires in this very answer
                assert fired and fired[0]["state"] == "firing"
                # nonfinite holds 20 steps (one alert an episode): 22 finite steps resolve it
                for i, step in enumerate(range(2, 24)):
                    still = _post(c, 3 + i, step, 2.4)
                assert still == []  # resolved by finite values, receivers still hanging
                assert time.monotonic() - t0 < 20  # no request waited on a receiver
                (alert,) = c.get("/api/v1/alerts", params={"run": "hooks"}).json()["alerts"]
                assert alert["rule"] == "nonfinite" and alert["state"] == "resolved"
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # retried: two attempts each at least
                    if hits.count("fail") >= 2 and hits.count("hang") >= 2:
                        break
                    time.sleep(0.2)
            release.set()
    finally:
        release.set()
        hang.shutdown(), fail.shutdown()
    assert hits.count("fail") >= 2 and hits.count("hang") >= 2
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT url, attempt, status FROM deliveries").fetchall()
    assert {u for u, _, _ in rows} == set(urls)  # every attempt recorded, per receiver
    assert max(a for _, a, _ in rows) >= 2 and all(s != "sent" for _, _, s in rows)
