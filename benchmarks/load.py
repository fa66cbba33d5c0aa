"""Load: N simulated training runs (real HttpSink senders, one process each) against the service.

    .venv/bin/python benchmarks/load.py                       # 50 runs x 200 series, 60 s
    .venv/bin/python benchmarks/load.py --runs 10 --series 50 --seconds 15 --only sqlite

Three setups in turn: one service process on SQLite, one on PostgreSQL, two service processes
on one PostgreSQL database (runs split between them). Prints points sent and stored (must be
equal), ingest latency p50/p99 (request to answer, as the sender sees it), alert evaluation
delay (a NaN loss logged -> its alert visible through the API), the service's peak RSS, and
errors (anything but 2xx and honoured 429s). Senders still behind when they close leave the
rest in their spools; the benchmark then uploads those with ``logitwatch sync`` and counts
again (``stored_before_sync`` shows how far live delivery got). PostgreSQL: a fresh database
on 127.0.0.1:5432.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import create_engine, text

from logitwatch.agent.transport.sender import (  # imported once, before forking
    HttpSink,
    SenderConfig,
)

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _database(kind: str, tmp: Path):
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'load.db'}"
        return
    name = f"lwload_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def _services(db_url: str, n: int, tmp: Path):
    procs, urls = [], []
    for i in range(n):
        port = _free_port()
        cmd = [sys.executable, "-m", "logitwatch", "serve", "--db", db_url, "--port", str(port)]
        log = open(tmp / f"serve{i}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        urls.append(f"http://127.0.0.1:{port}")
        if i == 0:
            _wait_ready(urls[0], procs[0][0])  # the first one migrates the database
    for url, (proc, _) in zip(urls, procs, strict=True):
        _wait_ready(url, proc)
    try:
        yield urls, [p for p, _ in procs]
    finally:
        for proc, log in procs:
            proc.terminate()
            proc.wait(30)
            log.close()


def _wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready")


def _rss_peak_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _sender(url: str, run: str, series: int, seconds: float, rate: float, nan_at: float | None,
            out: str, go: mp.Event, spool: str) -> None:  # fmt: skip
    """One training run: `series` series, `rate` steps a second, for `seconds`."""
    timings: list[float] = []
    codes: dict[str, int] = {}
    sink = HttpSink(url, run, spool_dir=spool, config=SenderConfig(batch_interval_s=1.0))

    def on_request(request):
        request.extensions["t0"] = time.perf_counter()

    def on_response(response):
        if response.request.url.path.endswith("/points"):
            timings.append(time.perf_counter() - response.request.extensions["t0"])
        if response.request.method != "GET":  # a GET of a run not yet made is a 404
            codes[str(response.status_code)] = codes.get(str(response.status_code), 0) + 1

    sink._poster.client.event_hooks = {"request": [on_request], "response": [on_response]}
    keys = [("loss", ())] + [
        ("attn.logit_max", (("head", str(i % 8)), ("layer", str(i // 8))))
        for i in range(series - 1)
    ]
    sink.register_run(run, config={"load": True})
    go.wait()
    start = time.monotonic()
    step, produced, nan_logged = 0, 0, None
    while time.monotonic() - start < seconds:
        loss = 3.0 - step * 1e-4
        if nan_at is not None and nan_logged is None and time.monotonic() - start >= nan_at:
            loss, nan_logged = float("nan"), time.time()
        values = {k: (loss if i == 0 else 1.0 + (step % 7) * 0.01) for i, k in enumerate(keys)}
        sink.log(step, values)
        produced += len(values)
        step += 1
        time.sleep(max(0.0, start + step / rate - time.monotonic()))
    sink.close(timeout=120)
    Path(out).write_text(json.dumps({"produced": produced, "timings": timings, "codes": codes,
                                     "nan_logged": nan_logged, "pending": sink.spool.pending(),
                                     "troubles": dict(sink.once.counts)}))  # fmt: skip


def _stored_points(db_url: str) -> int:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT COALESCE(SUM(n_points), 0) FROM batches")).scalar()
    engine.dispose()
    return int(n)


def _alert_seen(url: str, run: str, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            got = httpx.get(f"{url}/api/v1/alerts", params={"run": run}, timeout=10).json()
            if any(a.get("rule") == "nonfinite" for a in got.get("alerts", [])):
                return time.time()
        time.sleep(0.1)
    return None


def run_setup(label: str, kind: str, n_services: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="lwload-") as tmp_s:
        tmp = Path(tmp_s)
        with _database(kind, tmp) as db_url, _services(db_url, n_services, tmp) as (urls, procs):
            ctx = mp.get_context("fork")
            go = ctx.Event()
            workers = []
            for i in range(args.runs):
                nan_at = args.seconds / 2 if i == 0 else None
                w = ctx.Process(target=_sender, args=(
                    urls[i % len(urls)], f"load-{i}", args.series, args.seconds, args.rate,
                    nan_at, str(tmp / f"r{i}.json"), go, str(tmp / "spools" / f"load-{i}")))  # fmt: skip
                w.start()
                workers.append(w)
            time.sleep(2.0)  # senders register their runs
            go.set()
            t0 = time.monotonic()
            seen = _alert_seen(urls[0], "load-0", args.seconds + 60)
            peak = 0
            while any(w.is_alive() for w in workers):
                peak = max(peak, sum(_rss_peak_kb(p.pid) for p in procs))
                time.sleep(0.5)
            elapsed = time.monotonic() - t0
            peak = max(peak, sum(_rss_peak_kb(p.pid) for p in procs))
            results = [json.loads((tmp / f"r{i}.json").read_text()) for i in range(args.runs)]
            stored_live = stored = _stored_points(db_url)
            if any(r["pending"] for r in results):
                # Behind at close: the rest waits in the spools; upload it the documented way.
                cmd = [sys.executable, "-m", "logitwatch", "sync", str(tmp / "spools"),
                       "--server", urls[0]]  # fmt: skip
                subprocess.run(cmd, capture_output=True, timeout=args.seconds * 20)
                stored = _stored_points(db_url)
    timings = sorted(t for r in results for t in r["timings"])
    codes: dict[str, int] = {}
    for r in results:
        for c, n in r["codes"].items():
            codes[c] = codes.get(c, 0) + n
    nan_logged = results[0]["nan_logged"]
    return {
        "setup": label,
        "sent": sum(r["produced"] for r in results),
        "stored": stored,
        "stored_before_sync": stored_live,
        "pending_in_spools": sum(r["pending"] for r in results),
        "seconds": round(elapsed, 1),
        "p50_ms": round(1000 * statistics.median(timings), 1) if timings else None,
        "p99_ms": round(1000 * timings[int(0.99 * (len(timings) - 1))], 1) if timings else None,
        "requests": len(timings),
        "alert_delay_s": round(seen - nan_logged, 2) if seen and nan_logged else None,
        "peak_rss_mb": round(peak / 1024, 1),
        "http_429": codes.get("429", 0),
        "errors": {c: n for c, n in codes.items() if not c.startswith("2") and c != "429"},
        # Requests the senders gave up waiting for and retried (idempotent: never stored twice).
        "timeouts_retried": sum(r["troubles"].get("timeout", 0) for r in results),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50, help="simulated training runs (processes)")
    p.add_argument("--series", type=int, default=200, help="series per run")
    p.add_argument("--seconds", type=float, default=60.0, help="how long each run trains")
    # A pre-training step takes seconds; one report a second per run is already generous.
    p.add_argument("--rate", type=float, default=1.0, help="steps a second per run")
    p.add_argument("--only", choices=["sqlite", "postgresql", "postgresql-x2"], action="append")
    args = p.parse_args()
    setups = [("sqlite", "sqlite", 1), ("postgresql", "postgresql", 1),
              ("postgresql-x2", "postgresql", 2)]  # fmt: skip
    print(f"load: {args.runs} runs x {args.series} series, {args.rate:g} steps/s, "
          f"{args.seconds:g} s; {os.cpu_count()} CPUs", flush=True)  # fmt: skip
    ok = True
    for label, kind, n in setups:
        if args.only and label not in args.only:
            continue
        r = run_setup(label, kind, n, args)
        ok &= r["sent"] == r["stored"] and not r["errors"]
        print(json.dumps(r), flush=True)
    print("OK: every point stored, no errors" if ok else "FAILED: points lost or errors")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
