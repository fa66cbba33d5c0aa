"""Transport cost per training step: logitwatch's sender against W&B, MLflow and TensorBoard.

Every logger gets the same ``n_scalars`` floats per step (attention logit maxima per layer and
head, and the loss); we time the call the training thread makes, step by step. Between steps
the loop sleeps ``gap_ms`` (the GPU's time, not timed), which lets each logger's background
threads or processes run as they would in training. The peers run in a subprocess with
.venv-bench's Python (``bash benchmarks/setup_peers.sh``; without it, .venv's, where the
``[wandb]`` and ``[tensorboard]`` extras bring W&B and TensorBoard but not MLflow):
W&B in offline mode, MLflow with asynchronous logging to a local file store, and
``torch.utils.tensorboard.SummaryWriter.add_scalar`` once per scalar. Our WandbSink and
TensorBoardSink forward to the same tools from a thread of their own: their rows sit beside
the tools' own.

    .venv/bin/python benchmarks/transport.py [--steps 500] [--scalars 200] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"

# The loop shared by every transport: ``log(step, values)`` is timed, building values is not.
HARNESS = r"""
import json, statistics, sys, time
def keys(n):
    out = [("loss", ())]
    i = 0
    while len(out) < n:
        out.append(("attn.logit_max", (("head", str(i % 16)), ("layer", str(i // 16)))))
        i += 1
    return out
def flat(key):
    metric, labels = key
    return metric + "".join(f"/{k}_{v}" for k, v in labels)
def run_loop(log, n, steps, gap_s, warmup, flat_keys):
    ks = [flat(k) for k in keys(n)] if flat_keys else keys(n)
    times = []
    for step in range(steps + warmup):
        values = {k: step * 0.001 + i for i, k in enumerate(ks)}
        t0 = time.perf_counter()
        log(step, values)
        dt = time.perf_counter() - t0
        if step >= warmup:
            times.append(dt)
        time.sleep(gap_s)
    return times
def summary(times, close_s):
    s = sorted(times)
    return {"median_ms": 1e3 * statistics.median(s), "mean_ms": 1e3 * statistics.fmean(s),
            "p99_ms": 1e3 * s[int(0.99 * (len(s) - 1))], "close_s": close_s}
"""

PEERS: dict[str, str] = {
    "W&B (offline)": r"""
import os, wandb
os.environ["WANDB_SILENT"] = "true"
run = wandb.init(project="logitwatch-bench", mode="offline", dir=TMP, settings=wandb.Settings(console="off"))
def log(step, values):
    run.log(values, step=step)
times = run_loop(log, N, STEPS, GAP, WARMUP, True)
t0 = time.perf_counter(); run.finish(); close_s = time.perf_counter() - t0
""",
    "MLflow (async, file store)": r"""
import mlflow
mlflow.set_tracking_uri("file:" + TMP + "/mlruns")
mlflow.start_run()
def log(step, values):
    mlflow.log_metrics(values, step=step, synchronous=False)
times = run_loop(log, N, STEPS, GAP, WARMUP, True)
t0 = time.perf_counter(); mlflow.end_run(); close_s = time.perf_counter() - t0
""",
    "TensorBoard SummaryWriter": r"""
from torch.utils.tensorboard import SummaryWriter
writer = SummaryWriter(log_dir=TMP + "/tb")
def log(step, values):
    for k, v in values.items():
        writer.add_scalar(k, v, step)
times = run_loop(log, N, STEPS, GAP, WARMUP, True)
t0 = time.perf_counter(); writer.close(); close_s = time.perf_counter() - t0
""",
}


def _peer(name: str, code: str, n: int, steps: int, gap_ms: float, warmup: int) -> dict:
    row = {"transport": name, "steps": steps, "n_scalars": n}
    python = str(BENCH_PYTHON) if BENCH_PYTHON.exists() else sys.executable
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
        script = (
            HARNESS
            + f"TMP, N, STEPS, GAP, WARMUP = {tmp!r}, {n}, {steps}, {gap_ms / 1e3}, {warmup}\n"
            + code
            + "print('RESULT ' + json.dumps(summary(times, close_s)))\n"
        )
        env = {**os.environ, "WANDB_SILENT": "true", "MLFLOW_ENABLE_ASYNC_LOGGING": "true"}
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 keeps the file store behind a flag
        env.pop("PYTHONPATH", None)
        try:
            out = subprocess.run(
                [python, "-c", script],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=tmp,
                env=env,
            )
        except subprocess.TimeoutExpired:
            return {**row, "error": "timed out"}
        for line in out.stdout.splitlines():
            if line.startswith("RESULT "):
                return {**row, **json.loads(line[7:])}
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**row, "error": f"exit {out.returncode}: {tail[0][:200]}"}


@contextlib.contextmanager
def _service(tmp: str) -> Iterator[str | None]:
    """A real ``logitwatch serve`` on a free port (None when the service is not installed)."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "logitwatch", "serve", "--db", f"sqlite:///{tmp}/bench.db"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url if proc.poll() is None else None
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _thread_cpu_s(native_id: int | None) -> float:
    """User + system CPU seconds of one thread of this process (0 where /proc is missing)."""
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ours(label: str, n: int, steps: int, gap_ms: float, warmup: int, up: bool) -> dict:
    from logitwatch.agent.transport.sender import HttpSink

    ns: dict = {}
    exec(HARNESS, ns)
    row = {"transport": label, "steps": steps, "n_scalars": n}
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp, _service(tmp) as url:
        if up and url is None:
            return {**row, "error": f"the service did not start (see {tmp}/serve.log)"}
        server = url if up else "http://127.0.0.1:9"  # port 9: nothing listens, so it spools
        sink = HttpSink(server, "bench", spool_dir=Path(tmp) / "spool")
        threads = [sink._collector, sink._poster_thread]
        cpu0 = sum(_thread_cpu_s(t.native_id) for t in threads)
        times = ns["run_loop"](sink.log, n, steps, gap_ms / 1e3, warmup, False)
        cpu = sum(_thread_cpu_s(t.native_id) for t in threads) - cpu0
        t0 = time.perf_counter()
        # Service down: close waits 80 % of its timeout for the service, then leaves the spool.
        sink.close(timeout=30 if up else 2)
        out = ns["summary"](times, time.perf_counter() - t0)
        # What the sender threads cost besides: batching, msgpack, HTTP (from /proc, Linux).
        out["background_cpu_ms"] = 1e3 * cpu / (steps + warmup)
        if up:
            import httpx

            info = httpx.get(f"{url}/api/v1/runs/bench/series", timeout=10).json()
            out["stored_series"] = len(info.get("series", []))
    return {**row, **out}


def _tool_sink(label: str, tool: str, n: int, steps: int, gap_ms: float, warmup: int) -> dict:
    """Our WandbSink / TensorBoardSink: the training thread's call, and the writer thread's CPU."""
    ns: dict = {}
    exec(HARNESS, ns)
    row = {"transport": label, "steps": steps, "n_scalars": n}
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
        run = None
        try:
            if tool == "wandb":
                import wandb

                from logitwatch.agent.transport.wandb_sink import WandbSink

                os.environ["WANDB_SILENT"] = "true"
                settings = wandb.Settings(console="off")
                run = wandb.init(project="logitwatch-bench", mode="offline", dir=tmp,
                                 settings=settings)  # fmt: skip
                sink = WandbSink(run)
            else:
                from logitwatch.agent.transport.tensorboard_sink import TensorBoardSink

                sink = TensorBoardSink(Path(tmp) / "tb")
        except ImportError as exc:
            return {**row, "error": f"{exc} (pip install 'logitwatch[{tool}]')"}
        cpu0 = _thread_cpu_s(sink._thread.native_id)
        times = ns["run_loop"](sink.log, n, steps, gap_ms / 1e3, warmup, False)
        t0 = time.perf_counter()
        sink.flush(120)  # the writer thread's CPU is read while it still exists
        cpu = _thread_cpu_s(sink._thread.native_id) - cpu0
        sink.close(timeout=30)
        out = ns["summary"](times, time.perf_counter() - t0)
        out["background_cpu_ms"] = 1e3 * cpu / (steps + warmup)
        if run is not None:
            run.finish()
    return {**row, **out}


def measure_transports(
    n_scalars: int = 200, steps: int = 500, *, gap_ms: float = 1.0, warmup: int = 20
) -> list[dict]:
    """One row per transport: median/mean/p99 milliseconds per step, and close seconds."""
    runs: list[Callable[[], dict]] = [
        lambda: _ours("logitwatch HttpSink", n_scalars, steps, gap_ms, warmup, True),
        lambda: _ours(
            "logitwatch HttpSink (service down: spool)", n_scalars, steps, gap_ms, warmup, False
        ),
    ]
    for name, code in PEERS.items():
        runs.append(
            lambda name=name, code=code: _peer(name, code, n_scalars, steps, gap_ms, warmup)
        )
    for label, tool in (("logitwatch WandbSink (offline run)", "wandb"),
                        ("logitwatch TensorBoardSink", "tensorboard")):  # fmt: skip
        runs.append(
            lambda label=label, tool=tool: _tool_sink(label, tool, n_scalars, steps, gap_ms, warmup)
        )
    return [r() for r in runs]


def transport_table(rows: list[dict]) -> Any:
    """The rows as a table that fits 80 columns (a block per transport when narrower)."""
    from logitwatch.tables import Col, Records, num

    ours = next((r for r in rows if "median_ms" in r), None)
    table = Records(
        [Col("transport", readable=20), num("median ms"), num("mean ms"), num("p99 ms"),
         num("close s"), num("vs ours"), num("sender CPU ms/step")],
        title="Transport: milliseconds per step on the training thread; sender CPU: its threads",
    )  # fmt: skip
    for r in rows:
        if "error" in r:
            table.add_row(f"{r['transport']}\nerror: {r['error']}", *[""] * 6)
            continue
        ratio = r["median_ms"] / ours["median_ms"] if ours else float("nan")
        bg = r.get("background_cpu_ms")
        table.add_row(
            r["transport"], f"{r['median_ms']:.4f}", f"{r['mean_ms']:.4f}", f"{r['p99_ms']:.3f}",
            f"{r['close_s']:.2f}", f"{ratio:.1f}", "" if bg is None else f"{bg:.3f}",
        )  # fmt: skip
    return table


def format_rows(rows: list[dict], width: int | None = None) -> str:
    """transport_table as text at `width` columns (default: the terminal's, 80 into a pipe)."""
    from logitwatch.tables import render_text

    width = width or shutil.get_terminal_size((80, 24)).columns
    return render_text(transport_table(rows), width=width).rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--scalars", type=int, default=200)
    p.add_argument("--gap-ms", type=float, default=1.0, help="untimed sleep between steps")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.scalars < 1:
        p.error("--steps and --scalars must be positive")
    rows = measure_transports(args.scalars, args.steps, gap_ms=args.gap_ms)
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    ok = next((r for r in rows if "median_ms" in r), {}).get("median_ms", 1e9) <= 0.1
    print(
        f"target: logitwatch <= 0.1 ms per step for {args.scalars} scalars: {'met' if ok else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
