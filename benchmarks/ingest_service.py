"""logitwatch's side of benchmarks/ingest.py: a real `logitwatch serve` process on loopback,
concurrent msgpack clients, timed reads, and the database's size on disk."""

from __future__ import annotations

import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path

import httpx
import msgpack
import numpy as np
import psycopg
from ingest_data import block, series_labels
from sqlalchemy import create_engine, text

from logitwatch.protocol import MSGPACK_CONTENT_TYPE, Batch, Series, encode_batch

MSGPACK = {"content-type": MSGPACK_CONTENT_TYPE}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m logitwatch serve`` on a free loopback port, stopped on exit."""

    def __init__(self, db_url: str, workdir: Path) -> None:
        self.db_url = db_url
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.log_path = log_path = self.workdir / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "logitwatch", "serve", "--db", self.db_url,
               "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        env = {**os.environ, "LOGITWATCH_HOME": str(self.workdir)}
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"logitwatch serve exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("logitwatch serve did not become ready within 60 s")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far; NaN off Linux."""
        assert self.proc is not None
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, exc_type, *exc) -> None:
        assert self.proc is not None
        if exc_type is not None:  # the server's side of the story, before its folder goes
            print(self.log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _series(metric: str, labels: dict[str, str], series: int, start: int, n: int) -> Series:
    steps, values, times = block(series, start, n)
    s, v, t = array("q"), array("d"), array("d")
    s.frombytes(steps.tobytes())
    v.frombytes(values.tobytes())
    t.frombytes(times.tobytes())
    return Series(metric, labels, s, v, t)


def payloads(client: str, *, batches: int, series: int, steps: int) -> list[bytes]:
    """One client's batches: ``series`` attention-logit series x ``steps`` steps each."""
    return [
        encode_batch(
            Batch(
                client=client,
                seq=b,
                series=[
                    _series("attn.logit_max", series_labels(i), i, b * steps, steps)
                    for i in range(series)
                ],
            )
        )
        for b in range(batches)
    ]


def ingest(url: str, work: dict[str, list[bytes]], tick: Callable[[int], None]) -> float:
    """Post each run's payloads from its own thread, all at once; the wall time it took."""
    errors: list[str] = []

    def client(run: str, bodies: list[bytes]) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for body in bodies:
                r = http.post(f"/api/v1/runs/{run}/points", content=body, headers=MSGPACK)
                if r.status_code != 200 or r.json()["duplicate"]:
                    errors.append(f"{run}: {r.status_code} {r.text[:200]}")
                    return
                tick(r.json()["accepted"])

    threads = [threading.Thread(target=client, args=item) for item in work.items()]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"ingest failed: {errors[0]}")
    return time.perf_counter() - t0


def load_series(
    url: str, run: str, metric: str, n_points: int, *, per_batch: int = 100_000
) -> None:
    """One series of ``n_points`` points, sent in batches of ``per_batch``."""
    with httpx.Client(base_url=url, timeout=300) as http:
        for seq, start in enumerate(range(0, n_points, per_batch)):
            n = min(per_batch, n_points - start)
            body = encode_batch(Batch(f"load-{metric}", seq, 0, [_series(metric, {}, 0, start, n)]))
            r = http.post(f"/api/v1/runs/{run}/points", content=body, headers=MSGPACK)
            r.raise_for_status()


def read(
    url: str, run: str, metric: str, *, max_points: int | None, repeats: int
) -> tuple[float, int]:
    """Median seconds to read a metric into numpy arrays (every page), and its point count."""
    params: dict[str, str | int] = {"limit": 1_000_000}
    if max_points:
        params = {"max_points": max_points}
    times, count = [], 0
    with httpx.Client(base_url=url, timeout=300, headers={"accept": MSGPACK_CONTENT_TYPE}) as http:
        for _ in range(repeats + 1):  # the first read warms caches and is not counted
            t0 = time.perf_counter()
            count, cursor = 0, None
            while True:
                q = {**params, **({"cursor": cursor} if cursor else {})}
                r = http.get(f"/api/v1/runs/{run}/metrics/{metric}", params=q)
                r.raise_for_status()
                doc = msgpack.unpackb(r.content)
                for s in doc["series"]:
                    count += len(np.frombuffer(s["steps"], dtype="<i8"))
                    np.frombuffer(s["last"] if max_points else s["values"], dtype="<f8")
                cursor = doc.get("next_cursor")
                if not cursor:
                    break
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), count


def settle(db_url: str, *, quiet_s: float = 3.0, timeout_s: float = 180.0) -> int:
    """Wait until the server's background compaction stops changing the number of chunks
    (bytes on disk are measured at rest); returns that number."""
    engine = create_engine(db_url)
    try:
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with engine.connect() as con:
                n = con.execute(text("SELECT count(*) FROM chunks")).scalar_one()
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
            time.sleep(0.5)
        return last
    finally:
        engine.dispose()


def sqlite_bytes(path: Path) -> int:
    """Size of the database at rest: the WAL checkpointed into the main file first."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def postgres_bytes(dsn: str) -> int:
    """Tables, indexes and TOAST of the public schema (not the catalogue PostgreSQL keeps)."""
    with psycopg.connect(dsn) as con:
        return int(
            con.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> 'alembic_version'"
            ).fetchone()[0]
        )
