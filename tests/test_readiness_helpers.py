"""The shared test helpers that start outside processes wait for real readiness, and fail clearly.

A server that answers 503 while it starts (as prometheus does) is waited for, not queried; a
process that dies or never gets ready fails with its log; a JSON read shows status and body.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from helpers.answers import json_of
from helpers.server import wait_ready


@contextmanager
def _starting_server(unready_answers: int) -> Iterator[tuple[str, list[str]]]:
    """Answers 503 (plain text) to its first `unready_answers` requests, then 200 JSON."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            ready = len(seen) > unready_answers
            body = b'{"status": "ready"}' if ready else b"Service Unavailable"
            self.send_response(200 if ready else 503)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_wait_ready_waits_through_503_answers():
    with _starting_server(unready_answers=5) as (url, seen):
        wait_ready(url, 10, path="/-/ready")
        assert seen == ["/-/ready"] * 6
        assert json_of(httpx.get(f"{url}/api/v1/query")) == {"status": "ready"}


def test_wait_ready_times_out_naming_the_last_answer_and_the_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("opening the TSDB\n")
    with (
        _starting_server(unready_answers=10**6) as (url, _),
        pytest.raises(TimeoutError, match=r"(?s)last: 503 .*Service Unavailable.*opening the TSDB"),
    ):
        wait_ready(url, 0.3, log=log)


def test_wait_ready_fails_at_once_when_the_process_exits(tmp_path):
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        code = "import sys; print('cannot bind'); sys.exit(3)"
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out)
    proc.wait(30)
    with pytest.raises(RuntimeError, match=r"(?s)exited with status 3 .*cannot bind"):
        wait_ready("http://127.0.0.1:9", 60, proc, log=log)


def test_json_of_names_status_and_body_instead_of_a_decode_error():
    with _starting_server(unready_answers=1) as (url, _):
        r = httpx.get(f"{url}/api/v1/query")
        with pytest.raises(AssertionError, match=r"answered 503, not 200: 'Service Unavailable'"):
            json_of(r)
        with pytest.raises(AssertionError, match=r"answered 503 with a body that is not JSON"):
            json_of(r, status=None)
