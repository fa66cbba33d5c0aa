"""Bucketed reads: a long series read as 1,000 buckets from chunk summaries, and from its points.

    .venv/bin/python benchmarks/read.py            # 1,000,000 points, SQLite and PostgreSQL
    .venv/bin/python benchmarks/read.py --quick    # 200,000 points as 200 buckets, seconds

A real ``logitwatch serve`` on a fresh SQLite file, then on a fresh PostgreSQL database
(created and dropped). One series is sent in 10,000-point batches and read once the server's
compaction has settled, as ingest.py reads it: ``max_points=1000`` over HTTP in msgpack,
decoded into numpy, median of 7 after a warm-up. Then the chunk summaries are deleted and the
same read takes every point (what a read cost before summaries); both answers must be equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np
from ingest_service import Server, load_series
from load import database
from rich.console import Console
from sqlalchemy import create_engine, text

from logitwatch.protocol import MSGPACK_CONTENT_TYPE
from logitwatch.tables import Col, Records, num

RUN, METRIC = "bench-read", "bench.read_big"


def settle(db_url: str, *, quiet_s: float = 3.0, timeout_s: float = 300.0) -> int:
    """Wait until the server's compaction has merged the series (at most one chunk left
    without a summary) and stopped changing it; returns the number of summarized chunks."""
    engine = create_engine(db_url)
    q = text("SELECT (SELECT count(*) FROM chunks), (SELECT count(*) FROM chunk_summaries)")
    try:
        last, since = (0, 0), time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with engine.connect() as con:
                now = tuple(con.execute(q).one())
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s and now[0] - now[1] <= 1:
                break
            time.sleep(0.5)
        return last[1]
    finally:
        engine.dispose()


def timed_read(url: str, buckets: int, repeats: int) -> tuple[float, dict]:
    """Median seconds of a bucketed read into numpy, and the last answer's columns."""
    times, cols = [], {}
    with httpx.Client(base_url=url, timeout=300, headers={"accept": MSGPACK_CONTENT_TYPE}) as http:
        for _ in range(repeats + 1):  # the first read warms caches and is not counted
            t0 = time.perf_counter()
            r = http.get(f"/api/v1/runs/{RUN}/metrics/{METRIC}", params={"max_points": buckets})
            r.raise_for_status()
            (s,) = msgpack.unpackb(r.content)["series"]
            cols = {
                k: np.frombuffer(s[k], dtype="<i8" if k in ("steps", "count") else "<f8")
                for k in ("steps", "count", "min", "max", "last")
            }
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), cols


def run(kind: str, points: int, buckets: int, repeats: int, console: Console):
    """(seconds from summaries, seconds from points, same answer, summarized chunks)."""
    with (
        tempfile.TemporaryDirectory(prefix="lwread-") as tmp_s,
        database(kind, Path(tmp_s), prefix="lw_read") as db,
        Server(db, Path(tmp_s)) as srv,
    ):
        console.print(f"{kind}: sending {points:,} points, waiting for compaction")
        load_series(srv.url, RUN, METRIC, points, per_batch=10_000)
        summarized = settle(db)
        engine = create_engine(db)
        fast, a = timed_read(srv.url, buckets, repeats)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM chunk_summaries"))
        engine.dispose()
        slow, b = timed_read(srv.url, buckets, repeats)
    same = all(np.array_equal(a[k], b[k], equal_nan=k not in ("steps", "count")) for k in a)
    if int(a["count"].sum()) != points:
        raise RuntimeError(f"the buckets hold {int(a['count'].sum())} points, sent {points}")
    return fast, slow, same, summarized


def table(rows: list[tuple], points: int, buckets: int, repeats: int) -> Records:
    """rows: (database, seconds from summaries, seconds from points, same answer, chunks)."""
    out = Records(
        [Col("database", readable=10), num("summaries ms"), num("points ms"), num("speed-up"),
         num("summarized chunks"), "same answer"],
        title=f"{points:,}-point series read as {buckets:,} buckets (median of {repeats}, HTTP)",
    )  # fmt: skip
    for kind, fast, slow, same, chunks in rows:
        out.add_row(kind, f"{fast * 1e3:,.1f}", f"{slow * 1e3:,.1f}", f"{slow / fast:,.1f}×",
                    f"{chunks:,}", "yes" if same else "NO")  # fmt: skip
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200,000 points in 200 buckets, 3 repeats")
    p.add_argument("--points", type=int, default=1_000_000)
    p.add_argument("--buckets", type=int, default=1000, help="max_points of the read")
    p.add_argument("--only", choices=["SQLite", "PostgreSQL"], action="append")
    args = p.parse_args()
    points, buckets, repeats = (200_000, 200, 3) if args.quick else (args.points, args.buckets, 7)
    console = Console()
    rows = [(kind, *run(kind, points, buckets, repeats, console))
            for kind in args.only or ["SQLite", "PostgreSQL"]]  # fmt: skip
    console.print(table(rows, points, buckets, repeats))
    return 0 if all(row[3] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
