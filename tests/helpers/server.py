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


def wait_ready(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url}/readyz did not answer within {timeout} s")


def _spawn(db_url, workers, args, env) -> LiveServer:
    port = free_port()
    cmd = [
        sys.executable, "-m", "logitwatch", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), *args,
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
) -> Iterator[list[LiveServer]]:
    """n `python -m logitwatch serve` processes started together (one database), stopped on exit.

    db_url None leaves out --db (the default SQLite file, or LOGITWATCH_DB_URL in `env`).
    """
    servers = [_spawn(db_url, workers, args, env) for _ in range(n)]
    try:
        for server in servers:
            try:
                wait_ready(server.url, timeout, server.process)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}; server log:\n{server.log()}") from None
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
