"""A small real HTTP receiver speaking the ingest half of the protocol, for the sender's unit tests.

It decodes every batch with logitwatch.protocol, stores a (client, seq) once, and can be told
to go down (close its socket), answer 429/503 with Retry-After, or hang.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from logitwatch.protocol import ProtocolError, decode_batch

_RUN = re.compile(r"^/api/v1/runs/([^/]+)(/points)?$")


class Receiver:
    def __init__(self, port: int = 0, *, require_run: bool = False) -> None:
        self.require_run = require_run
        self.lock = threading.Lock()
        self.runs: dict[str, dict] = {}
        self.batches: dict[tuple[str, str, int], object] = {}  # (run, client, seq) -> Batch
        self.order: list[tuple[str, int]] = []  # (client, seq) in arrival order, new ones only
        self.requests: list[tuple[str, str, float]] = []  # (method, path, time)
        self.duplicates = 0
        self.answers: list[tuple[int, dict[str, str]]] = []  # forced (status, headers), FIFO
        self.alerts: list[dict] = []
        self.hang = threading.Event()  # set: requests block until release is set
        self.release = threading.Event()
        self.port = port
        self._server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, body=None, headers=None):
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver.lock:
                    receiver.requests.append((self.command, self.path, time.monotonic()))
                    forced = None
                    if receiver.answers and self.command == "POST":  # forced: ingest only
                        forced = receiver.answers.pop(0)
                if receiver.hang.is_set():
                    receiver.release.wait(30)
                    return self._answer(503, {"error": "released"})
                if forced:
                    return self._answer(forced[0], {"error": "forced"}, forced[1])
                m = _RUN.match(self.path)
                if not m:
                    return self._answer(404, {"error": "not_found"})
                run, points = m.group(1), m.group(2)
                if self.command == "PUT" and not points:
                    with receiver.lock:
                        receiver.runs[run] = json.loads(body or b"{}")
                    return self._answer(200, {"name": run})
                if self.command == "GET" and not points:
                    return receiver._run_info(self, run)
                if self.command == "POST" and points:
                    if receiver.require_run and run not in receiver.runs:
                        return self._answer(404, {"error": "unknown_run"})
                    try:
                        batch = decode_batch(body, self.headers.get("Content-Type"))
                    except ProtocolError as exc:
                        return self._answer(400, {"error": "bad_request", "detail": str(exc)})
                    key = (run, batch.client, batch.seq)
                    with receiver.lock:
                        dup = key in receiver.batches
                        if dup:
                            receiver.duplicates += 1
                        else:
                            receiver.batches[key] = batch
                            receiver.order.append((batch.client, batch.seq))
                        alerts = list(receiver.alerts)
                    return self._answer(
                        200, {"accepted": batch.n_points, "duplicate": dup, "alerts": alerts}
                    )
                return self._answer(405, {"error": "method"})

            do_GET = do_PUT = do_POST = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _run_info(self, handler, run):
        with self.lock:
            if run not in self.runs and not any(k[0] == run for k in self.batches):
                return handler._answer(404, {"error": "unknown_run"})
            batches = [b for k, b in self.batches.items() if k[0] == run]
        steps = [s for b in batches for ser in b.series for s in ser.steps]
        segs = [b.segment for b in batches]
        info = {"name": run, "max_segment": max(segs, default=0)}
        info["last_step"] = max(steps) if steps else None
        return handler._answer(200, info)

    def stop(self) -> None:
        """Go down: close the listening socket (connections are refused)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- what was stored ------------------------------------------------------------------
    def points(self, run: str | None = None) -> list[tuple[str, tuple, int, float, int]]:
        """(metric, labels, step, value, segment) of every stored point, in arrival order."""
        out = []
        with self.lock:
            items = [(k, self.batches[k]) for k in self.batches]
        for (r, _, _), b in items:
            if run is None or r == run:
                for s in b.series:
                    lab = tuple(sorted(s.labels.items()))
                    out.extend(
                        (s.metric, lab, st, v, b.segment)
                        for st, v in zip(s.steps, s.values, strict=True)
                    )
        return out
