"""SIGKILL the service while a group commit holds many requests' batches: after a restart,
every client sends again what it got no answer for (and some of what it did), and every point
is stored exactly once, on SQLite and on PostgreSQL.

Real processes: ``logitwatch serve`` under eight concurrent clients posting one-step,
fleet-shaped batches (loss, attention logits per layer and head), killed while requests are in
flight, so the group transaction open at that moment dies with them.
"""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest
from helpers.pg import database_url
from helpers.reads import stored_points
from helpers.server import free_port, serve_process

from logitwatch.protocol import MSGPACK_CONTENT_TYPE, Batch, encode_batch, series_from_columns

CLIENTS, STEPS, LAYERS, HEADS = 8, 40, 3, 4
MSGPACK = {"content-type": MSGPACK_CONTENT_TYPE}


def _value(client: int, step: int, k: int) -> float:
    return round(1.0 + client * 0.01 + step * 0.001 + k * 1e-5, 9)


def _batch(client: int, step: int) -> bytes:
    series = [series_from_columns("loss", {}, [step], [_value(client, step, 0)])]
    series += [
        series_from_columns(
            "attn.logit_max",
            {"layer": layer, "head": head},
            [step],
            [_value(client, step, 1 + layer * HEADS + head)],
        )
        for layer in range(LAYERS)
        for head in range(HEADS)
    ]
    return encode_batch(Batch(f"c{client}", step, 0, series))


class _Busy:
    """Set once the clients together have had `threshold` answers."""

    def __init__(self, threshold: int) -> None:
        self.event = threading.Event()
        self._n, self._threshold, self._lock = 0, threshold, threading.Lock()

    def count(self) -> None:
        with self._lock:
            self._n += 1
            if self._n >= self._threshold:
                self.event.set()


class _Client:
    """Posts its run's steps in order; a step counts as delivered only on a 200 answer."""

    def __init__(self, i: int, url: str, busy: _Busy) -> None:
        self.i, self.url, self.run, self.busy = i, url, f"group-{i}", busy
        self.answered: set[int] = set()
        self.in_flight: int | None = None
        self.duplicates = 0

    def post(self, http: httpx.Client, step: int) -> bool:
        self.in_flight = step
        try:
            r = http.post(f"/api/v1/runs/{self.run}/points", content=_batch(self.i, step),
                          headers=MSGPACK)  # fmt: skip
        except httpx.TransportError:
            return False
        finally:
            self.in_flight = None
        if r.status_code != 200:
            return False
        self.answered.add(step)
        self.duplicates += r.json()["duplicate"]
        self.busy.count()
        return True

    def stream(self, stop: threading.Event) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            for step in range(STEPS):
                if stop.is_set() or not self.post(http, step):
                    return


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_sigkill_during_a_group_commit_stores_every_point_once(tmp_path, kind):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    busy = _Busy(CLIENTS * 5)
    clients = [_Client(i, url, busy) for i in range(CLIENTS)]
    with (
        database_url(kind, tmp_path, "lwgroup") as db_url,
        open(tmp_path / "serve.log", "ab") as log,
    ):
        proc = serve_process(db_url, port, log)
        try:
            stop = threading.Event()
            threads = [threading.Thread(target=c.stream, args=(stop,)) for c in clients]
            for t in threads:
                t.start()
            # Kill once the service is busy: several requests waiting on one group commit.
            assert busy.event.wait(120), "the clients stopped early"
            in_flight = [c.in_flight for c in clients if c.in_flight is not None]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            stop.set()
            for t in threads:
                t.join(60)
            assert len(in_flight) >= 2, "the kill found no requests in flight"
            assert any(len(c.answered) < STEPS for c in clients)

            proc = serve_process(db_url, port, log)
            with httpx.Client(base_url=url, timeout=30) as http:
                for c in clients:
                    # What was answered before the kill, sent again, is a duplicate...
                    resent = sorted(c.answered)[-1:]
                    for step in resent:
                        assert c.post(http, step)
                    assert c.duplicates == len(resent)
                    # ...and every step without an answer is sent again, as an agent does.
                    for step in range(STEPS):
                        if step not in c.answered:
                            assert c.post(http, step)
                stored = {c.run: stored_points(url, c.run) for c in clients}
        finally:
            proc.kill()
            proc.wait(10)

    for c in clients:
        assert c.answered == set(range(STEPS))
        want_steps = list(range(STEPS))
        points = stored[c.run]
        assert len(points) == 1 + LAYERS * HEADS
        assert points[("loss", ())] == (want_steps, [_value(c.i, s, 0) for s in want_steps])
        for (metric, labels), (steps, values) in points.items():
            assert steps == want_steps, (c.run, metric, labels)  # every step once, in order
            if metric == "attn.logit_max":
                k = 1 + int(dict(labels)["layer"]) * HEADS + int(dict(labels)["head"])
                assert values == [_value(c.i, s, k) for s in want_steps]
