"""A private PostgreSQL cluster in a temp dir on a free port, for tests that stop the database.

The shared server on 5432 is never touched. initdb refuses to run as root, so as root the
cluster belongs to the ``postgres`` user (runuser); otherwise to the current user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from .server import free_port

__all__ = ["PgCluster", "pg_cluster"]


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"{name} not found under /usr/lib/postgresql/*/bin")
    return found[-1]


class PgCluster:
    """initdb'd data directory; ``start()``/``stop()`` as often as a test likes."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port
        self.data = directory / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        self.dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"

    def _run(self, *cmd: str) -> None:
        if os.geteuid() == 0:
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        if out.returncode:
            raise RuntimeError(
                f"{' '.join(cmd)} exited with status {out.returncode}:\n{out.stdout}{out.stderr}"
                f"{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        log = self.directory / "pg.log"
        return f"\npg.log:\n{log.read_text(errors='replace')[-5000:]}" if log.is_file() else ""

    def init(self) -> None:
        self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")  # fmt: skip

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c full_page_writes=off -c shared_buffers=16MB")  # fmt: skip
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                  str(self.directory / "pg.log"), "-w", "-t", "60", "start")  # fmt: skip
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until a connection over TCP succeeds, as the service's will: pg_ctl -w judges by
        the postmaster.pid file, which is not the path a test's client takes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"PostgreSQL on port {self.port} took no connection within {timeout} s"
                        f" ({exc}){self._log_tail()}"
                    ) from None
            time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """A started private cluster; stopped and deleted on exit."""
    directory = Path(tempfile.mkdtemp(prefix="lwpg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    cluster = PgCluster(directory, free_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if cluster.running():
            with contextlib.suppress(subprocess.SubprocessError, RuntimeError):
                cluster.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
