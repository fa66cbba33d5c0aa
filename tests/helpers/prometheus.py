"""Debian's prometheus for tests: started on a free loopback port, used once /-/ready says so.

scripts/setup.sh installs it; without it the tests that need it fail, they do not skip.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from .answers import json_of
from .server import free_port, wait_ready

__all__ = ["PROMETHEUS", "Prometheus", "prom_get", "prometheus"]

PROMETHEUS = shutil.which("prometheus") or "prometheus"


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def prometheus(config: dict, tmp: Path, timeout: float = 60.0) -> Iterator[Prometheus]:
    """prometheus with `config` (its YAML as a dict), data and log in `tmp`, stopped on exit.

    Yields only after /-/ready answers 200: until then its API answers 503 (TSDB and config
    still loading), and a query would fail on that, not on what the test checks.
    """
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    url = f"http://{address}"
    cmd = [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
           f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address={address}"]  # fmt: skip
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, timeout, proc, path="/-/ready", log=log_path)
        yield Prometheus(url, proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prom_get(url: str, path: str, **params: Any) -> Any:
    """The `data` of GET /api/v1/`path`; fails naming the status and body unless it succeeded."""
    body = json_of(httpx.get(f"{url}/api/v1/{path}", params=params, timeout=30))
    assert body["status"] == "success", body
    return body["data"]
