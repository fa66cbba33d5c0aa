"""Debian's prometheus-alertmanager for tests: a free loopback port, used once /-/ready says so.

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

__all__ = ["ALERTMANAGER", "AMTOOL", "Alertmanager", "alertmanager", "binary"]

ALERTMANAGER = "prometheus-alertmanager"  # Debian's name; /usr/bin/prometheus-alertmanager
AMTOOL = "amtool"


def binary(name: str) -> str:
    """The executable's path; a missing one fails the test with what to install."""
    found = shutil.which(name)
    assert found, (
        f"{name} not found: install Debian's prometheus-alertmanager "
        "(bash scripts/setup.sh as root does it)"
    )
    return found


@dataclass
class Alertmanager:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alerts(self, **params: Any) -> list[dict]:
        """GET /api/v2/alerts: the alerts it holds whose endsAt has not passed."""
        return json_of(httpx.get(f"{self.url}/api/v2/alerts", params=params, timeout=10))


@contextlib.contextmanager
def alertmanager(config: dict, tmp: Path, timeout: float = 60.0) -> Iterator[Alertmanager]:
    """prometheus-alertmanager with `config` (its YAML as a dict), storage and log in `tmp`,
    clustering off, stopped on exit; yields once /-/ready answers 200."""
    exe = binary(ALERTMANAGER)
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    url = f"http://{address}"
    cmd = [exe, f"--config.file={tmp / 'alertmanager.yml'}",
           f"--storage.path={tmp / 'am-data'}", f"--web.listen-address={address}",
           "--cluster.listen-address="]  # fmt: skip
    log_path = tmp / "alertmanager.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, timeout, proc, path="/-/ready", log=log_path)
        yield Alertmanager(url, proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
