"""The peers of benchmarks/ingest.py: raw one-row-per-point floors and MLflow's tracking server.

Floors: Python's sqlite3 ``executemany`` into a WAL table keyed by (series, step), and psycopg
``COPY`` into the same table on PostgreSQL, one transaction per 10,000-point batch. They show
what a row per point costs, in time and in bytes, on the same disk and database server.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from ingest_data import block

HERE = Path(__file__).resolve().parent
PEERS_PYTHON = HERE.parent / ".venv-bench" / "bin" / "python"


@dataclass
class Ingest:
    """Points written, seconds spent writing them (data making excluded), bytes on disk."""

    points: int
    seconds: float
    disk_bytes: int
    read_points: int = 0
    read_s: float = float("nan")

    @property
    def rate(self) -> float:
        return self.points / self.seconds

    @property
    def bytes_per_point(self) -> float:
        return self.disk_bytes / self.points


def _rows(batch: int, series: int, steps: int) -> list[tuple[int, int, float, float]]:
    rows: list[tuple[int, int, float, float]] = []
    for i in range(series):
        s, v, t = block(i, batch * steps, steps)
        rows.extend(zip([i] * steps, s.tolist(), v.tolist(), t.tolist(), strict=True))
    return rows


def sqlite_floor(
    workdir: Path, *, batches: int, series: int, steps: int, tick: Callable[[int], None]
) -> Ingest:
    path = workdir / "floor.sqlite"
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute(
        "CREATE TABLE points (series INTEGER NOT NULL, step INTEGER NOT NULL, "
        "value REAL NOT NULL, time REAL NOT NULL, PRIMARY KEY (series, step))"
    )
    spent = 0.0
    for b in range(batches):
        rows = _rows(b, series, steps)
        t = time.perf_counter()
        with con:
            con.executemany("INSERT INTO points VALUES (?, ?, ?, ?)", rows)
        spent += time.perf_counter() - t
        tick(len(rows))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    disk = sum(f.stat().st_size for f in workdir.glob("floor.sqlite*"))
    return Ingest(batches * series * steps, spent, disk)


def postgres_floor(
    dsn: str, *, batches: int, series: int, steps: int, tick: Callable[[int], None]
) -> Ingest:
    with psycopg.connect(dsn) as con:
        con.execute(
            "CREATE TABLE points (series integer NOT NULL, step bigint NOT NULL, "
            "value float8 NOT NULL, time float8 NOT NULL, PRIMARY KEY (series, step))"
        )
        con.commit()
        spent = 0.0
        for b in range(batches):
            rows = _rows(b, series, steps)
            t = time.perf_counter()
            with (
                con.cursor() as cur,
                cur.copy(
                    "COPY points (series, step, value, time) FROM STDIN (FORMAT BINARY)"
                ) as cp,
            ):
                cp.set_types(["int4", "int8", "float8", "float8"])
                for row in rows:
                    cp.write_row(row)
            con.commit()
            spent += time.perf_counter() - t
            tick(len(rows))
        disk = con.execute("SELECT pg_total_relation_size('points')").fetchone()[0]
    return Ingest(batches * series * steps, spent, disk)


def mlflow_peer(
    *, clients: int, batches: int, series: int, steps: int, read_points: int,
    tick: Callable[[int], None],
) -> Ingest:  # fmt: skip
    """Run ingest_mlflow.py in .venv-bench and relay its progress; raises if MLflow is absent."""
    if not PEERS_PYTHON.exists():
        raise FileNotFoundError("MLflow is not installed: run benchmarks/setup_peers.sh")
    cmd = [
        str(PEERS_PYTHON), str(HERE / "ingest_mlflow.py"),
        "--clients", str(clients), "--batches", str(batches), "--series", str(series),
        "--steps", str(steps), "--read-points", str(read_points),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    result = None
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if "progress" in event:
            tick(event["progress"])
        else:
            result = event["result"]
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0 or result is None:
        raise RuntimeError(f"the MLflow peer failed: {err.strip().splitlines()[-1:]}")
    return Ingest(
        result["points"], result["seconds"], result["db_bytes"],
        result["read_points"], result["read_s"],
    )  # fmt: skip
