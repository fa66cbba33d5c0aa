"""Ingest and read benchmark: logitwatch's server beside a raw row-per-point floor and MLflow.

    .venv/bin/python benchmarks/ingest.py            # full run (a few minutes)
    .venv/bin/python benchmarks/ingest.py --quick    # smoke test, under a minute, no MLflow

A real `logitwatch serve` process on loopback takes 4 concurrent clients posting 10,000-point
msgpack batches (100 series x 100 steps), on SQLite and on PostgreSQL. Beside it, on the same
disk and database server: Python sqlite3 executemany / psycopg COPY of one row per point, and
MLflow's tracking server (log_batch of 1,000 metrics; install it with setup_peers.sh).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from ingest_floors import Ingest, mlflow_peer, postgres_floor, sqlite_floor
from ingest_service import (
    Server,
    ingest,
    load_series,
    payloads,
    postgres_bytes,
    read,
    settle,
    sqlite_bytes,
)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from logitwatch.service.store.db import upgrade
from logitwatch.tables import Col, Records, num

SERIES, STEPS = 100, 100  # one batch: 100 series x 100 steps = 10,000 points
#: CPU seconds the `logitwatch serve` process spent on each system's ingest.
SERVER_CPU: dict[str, float] = {}
BIG, SMALL = "bench.read_big", "bench.read_small"  # the series the read figures read


@dataclass(frozen=True)
class Plan:
    clients: int
    batches: int  # per client
    big_read: int  # points of the series read at max_points=1000 and in full
    small_read: int  # points of the series read in full (MLflow reads the same)
    mlflow_batches: int  # per MLflow client; 0 skips MLflow
    repeats: int

    @property
    def points(self) -> int:
        return self.clients * self.batches * SERIES * STEPS


FULL = Plan(
    clients=4, batches=50, big_read=1_000_000, small_read=100_000, mlflow_batches=1, repeats=7
)
QUICK = Plan(clients=4, batches=5, big_read=100_000, small_read=10_000, mlflow_batches=0, repeats=3)


@dataclass
class Reads:
    big_bucketed_s: float
    big_full_s: float
    small_full_s: float


@contextmanager
def fresh_pg_db(admin_dsn: str, tag: str) -> Iterator[str]:
    """A new PostgreSQL database for one system, dropped afterwards."""
    name = f"lw_bench_{tag}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_service(
    db_url: str, workdir: Path, plan: Plan, size: Callable[[], int], progress: Progress, label: str
) -> tuple[Ingest, Reads]:
    upgrade(db_url)
    runs = {f"bench-{label}-{c}": f"c{c}" for c in range(plan.clients)}
    work = {
        run: payloads(client, batches=plan.batches, series=SERIES, steps=STEPS)
        for run, client in runs.items()
    }
    task = progress.add_task(f"logitwatch {label}: ingest", total=plan.points)
    with Server(db_url, workdir) as srv:
        cpu = srv.cpu_seconds()
        seconds = ingest(srv.url, work, lambda n: progress.advance(task, n))
        # The server's own CPU: on a shared machine the wall time also counts the clients.
        SERVER_CPU[f"logitwatch {label}"] = srv.cpu_seconds() - cpu
        progress.update(task, description=f"logitwatch {label}: compacting")
        settle(db_url)
    result = Ingest(plan.points, seconds, size())
    task = progress.add_task(f"logitwatch {label}: reads", total=4)
    with Server(db_url, workdir) as srv:
        # Metrics no built-in rule watches: loading them measures nothing, so it should be quick
        # (the rules engine is part of the ingest figures above, on attn.logit_max).
        # In 10,000-point batches, then compacted, as data that came in over time is stored.
        load_series(srv.url, "bench-read", BIG, plan.big_read, per_batch=10_000)
        load_series(srv.url, "bench-read", SMALL, plan.small_read, per_batch=10_000)
        settle(db_url)
        progress.advance(task)
        reads = []
        for metric, mp, want in (
            (BIG, 1000, None),
            (BIG, None, plan.big_read),
            (SMALL, None, plan.small_read),
        ):
            seconds, count = read(
                srv.url, "bench-read", metric, max_points=mp, repeats=plan.repeats
            )
            if want is not None and count != want:
                raise RuntimeError(f"read {count} points of {metric}, stored {want}")
            reads.append(seconds)
            progress.advance(task)
    return result, Reads(*reads)


def _ms(s: float) -> str:
    return "—" if math.isnan(s) else f"{s * 1000:,.1f}"


def report(
    console: Console, plan: Plan, ingests: dict[str, Ingest], reads: dict[str, Reads]
) -> None:
    mlflow = ingests.get("MLflow server (SQLite)")
    table = Records(
        [Col("system", readable=22), num("points"), num("seconds"), num("points/s"),
         num("vs MLflow"), num("bytes per point")],
        title=f"Ingest: {plan.clients} clients, batches of {SERIES * STEPS:,} points",
    )  # fmt: skip
    for name, r in ingests.items():
        vs = f"{r.rate / mlflow.rate:,.0f}×" if mlflow else "—"
        table.add_row(name, f"{r.points:,}", f"{r.seconds:.2f}", f"{r.rate:,.0f}", vs,
                      f"{r.bytes_per_point:.1f}")  # fmt: skip
    console.print(table)
    for name, cpu in SERVER_CPU.items():
        if name in ingests and cpu > 0:
            n = ingests[name].points
            console.print(f"{name}: server CPU {cpu * 1e6 / n:.2f} µs a point "
                          f"({n / cpu:,.0f} points per CPU-second)")  # fmt: skip
    for backend, floor in (("SQLite", "raw SQLite floor"), ("PostgreSQL", "raw PostgreSQL floor")):
        ours, raw = ingests.get(f"logitwatch {backend}"), ingests.get(floor)
        if ours and raw:
            console.print(f"logitwatch {backend} / {floor}: {ours.rate / raw.rate:.2f}× the "
                          f"points/s, {ours.bytes_per_point / raw.bytes_per_point:.2f}× the bytes")  # fmt: skip

    table = Records(
        [Col("system", readable=25), num(f"{plan.big_read:,} points in 1,000 buckets"),
         num(f"all {plan.big_read:,} points"), num(f"all {plan.small_read:,} points")],
        title=f"Reads in ms (median of {plan.repeats}, msgpack over HTTP into numpy)",
    )  # fmt: skip
    for name, r in reads.items():
        table.add_row(name, _ms(r.big_bucketed_s), _ms(r.big_full_s), _ms(r.small_full_s))
    if mlflow and mlflow.read_points:
        table.add_row("MLflow get_metric_history", "—", "—", _ms(mlflow.read_s))
    console.print(table)

    ours = ingests.get("logitwatch SQLite")
    r = reads.get("logitwatch SQLite")
    if ours and r:
        checks = [
            ("ingest on SQLite ≥ 1,000,000 points/s", f"{ours.rate:,.0f}", ours.rate >= 1e6),
            (
                "≤ 12 bytes per point on disk",
                f"{ours.bytes_per_point:.1f}",
                ours.bytes_per_point <= 12,
            ),
            (
                "1,000-bucket read of 1M points < 50 ms",
                _ms(r.big_bucketed_s),
                r.big_bucketed_s < 0.05,
            ),
            ("full read of 100k points < 20 ms", _ms(r.small_full_s), r.small_full_s < 0.02),
        ]
        if plan.big_read != 1_000_000:
            checks = checks[:2]  # --quick reads smaller series: the read targets do not apply
        table = Records([Col("target", readable=24), num("measured"), "met"],
                        title="Targets (logitwatch on SQLite)")  # fmt: skip
        for name, got, ok in checks:
            table.add_row(name, got, Text("yes", "green") if ok else Text("no", "red"))
        console.print(table)


PARTS = ("sqlite", "postgres", "floors", "mlflow")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, no MLflow: < 1 minute")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                   help="a PostgreSQL DSN allowed to create databases ('' to skip PostgreSQL)")  # fmt: skip
    p.add_argument("--no-mlflow", action="store_true", help="skip MLflow")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)")  # fmt: skip
    args = p.parse_args()
    only = set(args.only.split(","))
    if not only <= set(PARTS):
        p.error(f"--only takes {', '.join(PARTS)}, not {args.only!r}")
    if not args.pg:
        only.discard("postgres")
    if args.no_mlflow or args.quick:
        only.discard("mlflow")
    plan = QUICK if args.quick else FULL
    console = Console()
    ingests: dict[str, Ingest] = {}
    reads: dict[str, Reads] = {}
    failed: dict[str, str] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with (
        tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp,
        Progress(*columns, console=console) as progress,
    ):
        work = Path(tmp)

        def tick(name: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(name, total=total)
            return lambda n: progress.advance(task, n)

        def sqlite_service() -> None:
            db = work / "logitwatch.db"
            ingests["logitwatch SQLite"], reads["logitwatch SQLite"] = run_service(
                f"sqlite:///{db}", work, plan, lambda: sqlite_bytes(db), progress, "SQLite"
            )

        def postgres_service() -> None:
            with fresh_pg_db(args.pg, "svc") as dsn:
                ingests["logitwatch PostgreSQL"], reads["logitwatch PostgreSQL"] = run_service(
                    _sqlalchemy_url(dsn), work, plan, lambda: postgres_bytes(dsn), progress,
                    "PostgreSQL",
                )  # fmt: skip

        def floors() -> None:
            floor_dir = work / "floor"
            floor_dir.mkdir()
            ingests["raw SQLite floor"] = sqlite_floor(
                floor_dir, batches=plan.clients * plan.batches, series=SERIES, steps=STEPS,
                tick=tick("raw SQLite floor (executemany)", plan.points),
            )  # fmt: skip
            if args.pg:
                with fresh_pg_db(args.pg, "floor") as dsn:
                    ingests["raw PostgreSQL floor"] = postgres_floor(
                        dsn, batches=plan.clients * plan.batches, series=SERIES, steps=STEPS,
                        tick=tick("raw PostgreSQL floor (COPY)", plan.points),
                    )  # fmt: skip

        def mlflow() -> None:
            n = plan.clients * plan.mlflow_batches * SERIES * STEPS + plan.small_read
            ingests["MLflow server (SQLite)"] = mlflow_peer(
                clients=plan.clients, batches=plan.mlflow_batches, series=SERIES, steps=STEPS,
                read_points=plan.small_read, tick=tick("MLflow server (log_batch)", n),
            )  # fmt: skip

        parts = {"sqlite": sqlite_service, "postgres": postgres_service, "floors": floors,
                 "mlflow": mlflow}  # fmt: skip
        for name, part in parts.items():
            if name not in only:
                continue
            try:
                part()
            except Exception as exc:  # one part failing must not lose the others' figures
                failed[name] = f"{type(exc).__name__}: {exc}"
                progress.console.print(f"[red]{name} failed:[/] {failed[name]}", markup=True)
                continue
            for system, r in ingests.items():  # figures as they come, in case of a later crash
                if system not in _printed:
                    _printed.add(system)
                    progress.console.print(
                        f"{system}: {r.rate:,.0f} points/s, {r.bytes_per_point:.1f} bytes/point"
                    )
    report(console, plan, ingests, reads)
    for name, why in failed.items():
        console.print(f"[red]{name} failed:[/] {why}")


_printed: set[str] = set()


def _sqlalchemy_url(dsn: str) -> str:
    """A libpq key=value DSN as a SQLAlchemy psycopg URL."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host, port = info.get("host", "127.0.0.1"), info.get("port", "5432")
    auth = info.get("user", "postgres") + (f":{info['password']}" if info.get("password") else "")
    return f"postgresql+psycopg://{auth}@{host}:{port}/{info['dbname']}"


if __name__ == "__main__":
    main()
