"""MLflow's side of benchmarks/ingest.py; runs inside .venv-bench (see setup_peers.sh).

Starts ``mlflow server`` on an SQLite file, logs the benchmark's points with ``log_batch`` of
1,000 metrics from concurrent clients, reads a series back with ``get_metric_history``, and
prints one JSON line per event: ``{"progress": n}`` as points land, then ``{"result": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from ingest_data import block, series_labels
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

LOG_BATCH = 1000  # MLflow's own cap on metrics per log_batch call


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def _start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    db = workdir / "mlflow.db"
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri", f"sqlite:///{db}",
        "--default-artifact-root", str(workdir / "artifacts"),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    with open(workdir / "server.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # its first start migrates a new database
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited: {(workdir / 'server.log').read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("mlflow server did not answer /health within 300 s")


def _metrics(series: int, start: int, n: int) -> list[Metric]:
    steps, values, times = block(series, start, n)
    lab = series_labels(series)
    key = f"attn.logit_max.layer{lab['layer']}.head{lab['head']}"
    return [
        Metric(key, float(v), int(t * 1000), int(s))
        for s, v, t in zip(steps.tolist(), values.tolist(), times.tolist(), strict=True)
    ]


def _client(client: MlflowClient, run_id: str, batches: int, series: int, steps: int, done) -> None:
    for b in range(batches):
        metrics = [m for i in range(series) for m in _metrics(i, b * steps, steps)]
        for k in range(0, len(metrics), LOG_BATCH):
            client.log_batch(run_id, metrics=metrics[k : k + LOG_BATCH], synchronous=True)
        done(len(metrics))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--batches", type=int, default=2, help="batches per client")
    p.add_argument("--series", type=int, default=100)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--read-points", type=int, default=100_000)
    p.add_argument("--read-repeats", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

    with tempfile.TemporaryDirectory(prefix="lw-bench-mlflow-") as tmp:
        workdir = Path(tmp)
        proc, url = _start_server(workdir)
        try:
            client = MlflowClient(tracking_uri=url)
            exp = client.create_experiment("bench")
            runs = [client.create_run(exp).info.run_id for _ in range(args.clients)]
            lock = threading.Lock()
            total = [0]

            def done(n: int) -> None:
                with lock:
                    total[0] += n
                    _emit(progress=n)

            t0 = time.perf_counter()
            threads = [
                threading.Thread(
                    target=_client, args=(client, r, args.batches, args.series, args.steps, done)
                )
                for r in runs
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            ingest_s = time.perf_counter() - t0
            ingested = total[0]
            db_bytes = sum(f.stat().st_size for f in workdir.glob("mlflow.db*"))

            # One series of read_points points, then read all of it back (median of repeats).
            read_run = client.create_run(exp).info.run_id
            step = 10_000
            for start in range(0, args.read_points, step):
                ms = [
                    Metric("loss", m.value, m.timestamp, m.step)
                    for m in _metrics(0, start, min(step, args.read_points - start))
                ]
                for k in range(0, len(ms), LOG_BATCH):
                    client.log_batch(read_run, metrics=ms[k : k + LOG_BATCH], synchronous=True)
                _emit(progress=len(ms))
            reads = []
            for _ in range(args.read_repeats):
                t = time.perf_counter()
                hist = client.get_metric_history(read_run, "loss")
                reads.append(time.perf_counter() - t)
                if len(hist) != args.read_points:
                    raise RuntimeError(f"get_metric_history gave {len(hist)} points")
            _emit(
                result={
                    "points": ingested,
                    "seconds": ingest_s,
                    "db_bytes": db_bytes,
                    "read_points": args.read_points,
                    "read_s": statistics.median(reads),
                }
            )
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
