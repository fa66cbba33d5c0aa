"""``logitwatch demo``: the service on embedded SQLite, two training runs streaming into it.

One healthy run (the llama2-style preset: QK-norm, z-loss, warmup + cosine) and the same
model without QK-norm at a high learning rate train side by side on the CPU; a live view
shows their loss, attention max logit, log Z and the alerts as they fire. At the end a
summary table and a PNG chart, then the service keeps running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from logitwatch.client import ApiClient, ServiceError, runs_path
from logitwatch.plot import PlotError, plot_runs
from logitwatch.tables import Col, Records, num

__all__ = ["add_arguments", "run"]

HEALTHY = "demo-healthy"
UNSTABLE = "demo-no-qknorm"
#: What makes the healthy run healthy (the preset alone has neither).
HEALTHY_FLAGS = ["--qk-norm", "--z-loss", "1e-4"]


@dataclass
class RunView:
    name: str
    label: str
    step: int = 0
    loss: float = math.nan
    attn_max: float = math.nan
    logz: float = math.nan
    alerts: list[dict] = field(default_factory=list)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    p.add_argument(
        "--port", type=int, default=8000, help="service port (default 8000; a free one if busy)"
    )
    p.add_argument("--db", help="database URL (default: an SQLite file under --out)")
    p.add_argument("--out", default=".logitwatch/demo", help="where the database and chart go")
    p.add_argument("--server", help="use an existing service at this URL instead of starting one")
    p.add_argument("--no-serve", action="store_true", help="stop the service at the end")
    p.add_argument("--lr-unstable", type=float, default=3e-2, help="LR of the run without QK-norm")


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _start_service(db: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "logitwatch", "serve", "--db", db, "--port", str(port)]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _start_trainer(url: str, run: str, steps: int, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "logitwatch", "train", "--preset", "llama2", "--steps", str(steps),
        "--server", url, "--run", run, "--seed", "0", "--every", "2", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGITWATCH_PROGRESS": "0"}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def _num(v) -> float:
    if isinstance(v, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(v, math.nan)
    return math.nan if v is None else float(v)


def _latest(api: ApiClient, run: str, metric: str) -> tuple[int, float]:
    """(last step, max over the metric's series of their last value)."""
    try:
        series = api.series(run, metric=metric)
    except ServiceError as exc:
        if exc.status is None:  # unreachable: _poll skips this round
            raise
        return 0, math.nan
    rows = [s for s in series if s.get("last_step") is not None]
    vals = [_num(s.get("last_value")) for s in rows]
    vals = [v for v in vals if not math.isnan(v)]
    step = max((int(s["last_step"]) for s in rows), default=0)
    return step, (max(vals) if vals else math.nan)


def _poll(api: ApiClient, view: RunView) -> None:
    with contextlib.suppress(ServiceError, ValueError):
        view.step, view.loss = _latest(api, view.name, "loss")
        view.logz = _latest(api, view.name, "logz.mean")[1]
        view.attn_max = _latest(api, view.name, "attn.logit_max")[1]
        view.alerts = list(api.alerts(run=view.name))


def _grouped(views: list[RunView]) -> list[tuple[str, str, str, int, int, str]]:
    """One row per (run, rule): severity, where (layers/heads), first step, count, hint."""
    groups: dict[tuple[str, str], dict] = {}
    for v in views:
        for a in v.alerts:
            g = groups.setdefault(
                (v.name, str(a.get("rule"))),
                {"severity": a.get("severity"), "first": None, "n": 0, "hint": "", "layers": set()},
            )
            g["n"] += 1
            if a.get("severity") == "critical":
                g["severity"] = "critical"
            first = a.get("first_step")
            if first is not None and (g["first"] is None or int(first) < g["first"]):
                g["first"], g["hint"] = int(first), str(a.get("hint") or "")
            layer = (a.get("labels") or {}).get("layer")
            if layer is not None:
                g["layers"].add(str(layer))
    rows = []
    for (run, rule), g in groups.items():
        where = "layers " + ",".join(sorted(g["layers"])) if g["layers"] else ""
        rows.append((run, str(g["severity"]), rule, where, g["first"] or 0, g["n"], g["hint"]))
    return sorted(rows, key=lambda r: (r[0], r[4]))


def _table(views: list[RunView], steps: int) -> Group:
    t = Records(
        [Col("run", readable=14), num("step"), num("loss"), num("attn max logit"),
         num("log Z mean"), num("open alerts")],
        title="logitwatch demo: two runs streaming into the service",
        caption="  ".join(f"{v.name}: {v.label}" for v in views),
    )  # fmt: skip
    for v in views:
        firing = [a for a in v.alerts if a.get("state") in ("firing", "pending")]
        t.add_row(
            v.name, f"{v.step}/{steps}", f"{v.loss:.3f}", f"{v.attn_max:.1f}",
            f"{v.logz:.2f}", str(len(firing)),
        )  # fmt: skip
    # Severity and layers go under the rule: seven columns side by side do not fit 80.
    hints = Records(
        [Col("run", readable=14), Col("rule", readable=17), num("first step"), num("series"),
         Col("hint", readable=20)],
        title="alerts by rule (first step, how many series)",
    )  # fmt: skip
    for run, sev, rule, where, first, n, hint in _grouped(views):
        style = "red" if sev == "critical" else "yellow"
        detail = Text.assemble((sev, style), f", {where}" if where else "")
        hints.add_row(run, Text.assemble(rule, "\n", detail), str(first), str(n), hint)
    return Group(t, hints)


def run(args: argparse.Namespace) -> int:
    console = Console() if sys.stdout.isatty() else Console(width=150)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    service = None
    if args.server:
        url = args.server.rstrip("/")
    else:
        db = args.db or f"sqlite:///{(out / 'logitwatch.db').resolve()}"
        port = _free_port(args.port)
        url = f"http://127.0.0.1:{port}"
        console.print(f"starting the service on {url} ({db})")
        service = _start_service(db, port, out / "service.log")
    trainers: list[subprocess.Popen] = []
    try:
        with ApiClient(url) as api:
            api.wait_ready(60, process=service, interval=0.3)
        views = [
            RunView(HEALTHY, "QK-norm + z-loss 1e-4, warmup + cosine"),
            RunView(UNSTABLE, f"no QK-norm, no z-loss, LR {args.lr_unstable:g}"),
        ]
        logs = Path(tempfile.mkdtemp(prefix="logitwatch-demo-"))
        trainers = [
            _start_trainer(url, HEALTHY, args.steps, HEALTHY_FLAGS, logs / "healthy.log"),
            _start_trainer(
                url, UNSTABLE, args.steps,
                ["--no-qk-norm", "--z-loss", "0", "--lr", str(args.lr_unstable), "--warmup", "10"],
                logs / "unstable.log",
            ),
        ]  # fmt: skip
        with ApiClient(url, timeout=5) as api, Live(console=console, refresh_per_second=2) as live:
            while any(t.poll() is None for t in trainers):
                for v in views:
                    _poll(api, v)
                live.update(_table(views, args.steps))
                time.sleep(1.0)
            time.sleep(1.5)  # the senders' last batches
            for v in views:
                _poll(api, v)
            live.update(_table(views, args.steps))
        for t, name in zip(trainers, ("healthy", "unstable"), strict=True):
            if t.returncode != 0:
                console.print(
                    f"[red]the {name} trainer exited with {t.returncode}; see {logs}[/red]"
                )
        try:
            with ApiClient(url, timeout=30) as api:
                chart = plot_runs(api, [v.name for v in views], out=out / "demo.png")
            console.print(f"chart: {chart}")
        except (PlotError, ServiceError) as exc:  # the runs are in the service all the same
            console.print(f"no chart: {exc}", highlight=False, markup=False)
        console.print(f"REST: {url}{runs_path()}   metrics: {url}/metrics   docs: {url}/docs")
        if service is not None and not args.no_serve:
            console.print("the service keeps running; Ctrl-C to stop")
            service.wait()
        return 0 if all(t.returncode == 0 for t in trainers) else 1
    finally:
        for t in trainers:
            if t.poll() is None:
                t.terminate()
        if service is not None and service.poll() is None:
            service.send_signal(signal.SIGINT)
            try:
                service.wait(10)
            except subprocess.TimeoutExpired:
                service.kill()
