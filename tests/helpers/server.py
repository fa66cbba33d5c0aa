"""Real service processes and in-process uvicorn servers on free loopback ports, for tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "LiveServer",
    "free_port",
    "live_server",
    "live_servers",
    "thread_server",
    "wait_ready",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    port: int
    db_url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    final_log: str | None = None

    def log(self) -> str:
        """The process's output so far (kept after the server stops)."""
        if self.final_log is not None:
            return self.final_log
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


def wait_ready(
    url: str,
    timeout: float = 30.0,
    process: subprocess.Popen | None = None,
    *,
    path: str = "/readyz",
    log: Path | None = None,
) -> None:
    """Return once GET url + path answers 200: the server's own readiness signal (a starting
    server may refuse connections or answer 503 for a while, so a first request can fail).

    Fails (RuntimeError) as soon as `process` exits, or (TimeoutError) after `timeout` seconds,
    with the last answer seen and the end of `log`, the process's output.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{' '.join(map(str, process.args))[:300]} exited with status"
                f" {process.returncode} before {url}{path} answered 200 (last: {last}){_tail(log)}"
            )
        try:
            r = httpx.get(f"{url}{path}", timeout=2)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]!r}"
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{url}{path} did not answer 200 within {timeout} s (last: {last}){_tail(log)}"
            )
        time.sleep(0.05)


def _tail(log: Path | None, chars: int = 5000) -> str:
    if log is None:
        return ""
    text = Path(log).read_text(errors="replace") if Path(log).is_file() else "(no log file)"
    return f"; its log:\n{text[-chars:]}"


def _spawn(db_url, workers, args, env, host) -> LiveServer:
    port = free_port()
    cmd = [
        sys.executable, "-m", "logitwatch", "serve",
        "--host", host, "--port", str(port), "--workers", str(workers), *args,
    ]  # fmt: skip
    if db_url is not None:
        cmd += ["--db", db_url]
    full_env = {**os.environ, **(env or {})}
    with tempfile.NamedTemporaryFile("w+b", prefix="lwserver-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    return LiveServer(f"http://127.0.0.1:{port}", port, db_url or "", proc, log_path)


def _stop(server: LiveServer) -> None:
    proc = server.process
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    server.final_log = server.log()
    server.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def live_servers(
    db_url: str | None,
    n: int = 1,
    *,
    workers: int = 1,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    host: str = "127.0.0.1",
) -> Iterator[list[LiveServer]]:
    """n `python -m logitwatch serve` processes started together (one database), stopped on exit.

    db_url None leaves out --db (the default SQLite file, or LOGITWATCH_DB_URL in `env`). `host`
    is what they bind (a wider one, such as 0.0.0.0, still answers on `url`, the loopback).
    """
    servers = [_spawn(db_url, workers, args, env, host) for _ in range(n)]
    try:
        for server in servers:
            wait_ready(server.url, timeout, server.process, log=server.log_path)
        yield servers
    finally:
        for server in servers:
            _stop(server)


@contextlib.contextmanager
def live_server(db_url: str | None, **kwargs: Any) -> Iterator[LiveServer]:
    """One real `logitwatch serve` process on a free port (see live_servers)."""
    with live_servers(db_url, 1, **kwargs) as (server,):
        yield server


@contextlib.contextmanager
def thread_server(app: Any) -> Iterator[LiveServer]:
    """Serve an ASGI `app` with uvicorn on a free loopback port in a background thread."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield LiveServer(
            url, port, str(getattr(app.state, "settings", None) and app.state.settings.db_url)
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve_process(db_url: str, port: int, log) -> subprocess.Popen:
    """``logitwatch serve`` on ``port`` as a process of its own (to kill), once it is ready;
    its output goes to the open file ``log``."""
    cmd = [sys.executable, "-m", "logitwatch", "serve", "--db", db_url]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}", 60, proc, log=Path(log.name))
    return proc
