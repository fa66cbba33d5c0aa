"""``logitwatch zoo``: train the instability zoo through the real agent into a service, and score it.

Each case (stable controls, failing configurations, corrupted batches) runs for several seeds in
worker processes; the service's alerts are read back and set against when each run diverged.

Divergence: a non-finite loss; or a trailing-mean loss that stays above ln(vocab) to the end; or
one that stays at least 0.2 nats above the stable control of the same seed to the end (at this
scale runs without QK-norm stall rather than blow up, so the gap is what shows it).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from logitwatch.agent.zoo_cases import CASES, REDUCED, ZooCase, ZooScale, cases_named
from logitwatch.agent.zoo_report import Score, describe, score
from logitwatch.agent.zoo_runs import RunOutput, run_case

__all__ = ["ZooResult", "add_arguments", "print_table", "run", "run_zoo"]


@dataclass
class ZooResult:
    scale: ZooScale
    scores: list[Score]
    outputs: list[RunOutput]
    seconds: float
    server: str

    @property
    def passed(self) -> bool:
        return all(s.passed is not False for s in self.scores)


def run_zoo(
    cases: list[ZooCase],
    scale: ZooScale,
    *,
    server: str | None = None,
    jobs: int = 2,
    out: str | os.PathLike[str] | None = None,
    plots: bool = True,
) -> ZooResult:
    """Train every case x seed (``jobs`` at a time), fetch the alerts, score, plot."""
    if jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1; got {jobs!r}.")
    if not any(c.name == "stable" for c in cases):  # every divergence is judged against it
        cases = [c for c in CASES if c.name == "stable"] + list(cases)
    start = time.perf_counter()
    prefix = f"zoo-{time.strftime('%Y%m%d-%H%M%S')}-"
    with contextlib.ExitStack() as stack:
        url = server or stack.enter_context(_local_service())
        work = [(c, seed) for seed in range(scale.seeds) for c in cases]
        work.sort(key=lambda cs: not cs[0].overrides.get("bf16", False))  # slowest first
        ctx = multiprocessing.get_context("spawn")  # fork and torch's threads do not mix
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = [pool.submit(run_case, c, scale, seed, url, prefix) for c, seed in work]
            outputs = [f.result() for f in futures]
        alerts = {o.run: _alerts(url, o.run) for o in outputs}
    scores = _score_all(cases, scale, outputs, alerts)
    result = ZooResult(scale, scores, outputs, time.perf_counter() - start, url)
    if out is not None:
        _write(result, Path(out), plots)
    return result


def _score_all(cases, scale, outputs, alerts) -> list[Score]:
    from logitwatch.agent.train_config import TrainConfig

    by_name = {c.name: c for c in cases}
    control = {o.seed: o.losses for o in outputs if o.case == "stable" and not o.error}
    probe = TrainConfig(**scale.train_overrides())
    warmup = probe.schedule_config().warmup_steps
    vocab = probe.decoder_config().vocab_size
    window = max(10, scale.steps // 15)
    scores = []
    for o in outputs:
        ref = None if o.case == "stable" else control.get(o.seed)
        scores.append(
            score(by_name[o.case], o, alerts[o.run], ref, vocab=vocab, warmup=warmup, window=window)
        )
    order = {c.name: i for i, c in enumerate(cases)}
    return sorted(scores, key=lambda s: (order[s.case], s.seed))


def _alerts(url: str, run: str) -> list[dict[str, Any]]:
    import httpx

    answer = httpx.get(f"{url}/api/v1/alerts", params={"run": run, "limit": 10_000}, timeout=30)
    answer.raise_for_status()
    return answer.json()["alerts"]


@contextlib.contextmanager
def _local_service() -> Iterator[str]:
    """``logitwatch serve`` on a free loopback port with a throwaway SQLite file."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="lwzoo-db-") as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "logitwatch", "serve", "--port", str(port),
               "--db", f"sqlite:///{tmp}/zoo.db"]  # fmt: skip
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    text = (Path(tmp) / "serve.log").read_text(errors="replace")
                    raise RuntimeError(f"zoo: the service did not start:\n{text}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _write(result: ZooResult, out: Path, plots: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "scale": asdict(result.scale),
        "seconds": result.seconds,
        "scores": [asdict(s) for s in result.scores],
        "runs": [asdict(o) for o in result.outputs],
    }
    (out / "zoo.json").write_text(json.dumps(data, indent=1, default=str))
    if plots:
        from logitwatch.agent.zoo_plot import plot_run

        by_run = {s.run: s for s in result.scores}
        control = {o.seed: o for o in result.outputs if o.case == "stable"}
        for o in result.outputs:
            plot_run(o, by_run[o.run], control.get(o.seed), out / f"{o.case}-s{o.seed}.png")


def print_table(result: ZooResult, console: Any = None) -> None:
    """One row per configuration and seed."""
    from rich.console import Console
    from rich.table import Table

    s = result.scale
    table = Table(
        title=f"logitwatch zoo: {s.steps} steps, batch {s.batch_size}x{s.seq_len}, "
        f"{s.n_layers} layers x d{s.d_model}, {len(result.scores)} runs in {result.seconds:.0f} s"
    )
    for col in ("case", "seed", "kind", "diverged", "first warning", "first critical", "lead"):
        table.add_column(col)
    table.add_column("final loss", justify="right")
    table.add_column("verdict")
    for r in result.scores:
        div = f"@{r.diverged_at} ({r.reason})" if r.diverged_at is not None else "no"
        lead = "-" if r.lead_steps is None else f"{r.lead_steps} steps"
        mark = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[yellow]n/a[/]"}[r.passed]
        table.add_row(
            r.case, str(r.seed), r.kind, div, describe(r.first_warning),
            describe(r.first_critical), lead, f"{r.final_loss:.3f}", f"{mark} {r.why}",
        )  # fmt: skip
    # Wide enough for the table when the output is a pipe or a file (CI logs, tee).
    (console or Console(width=None if sys.stdout.isatty() else 200)).print(table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("--reduced", action="store_true", help="the small, quick zoo (tests)")
    parser.add_argument(
        "--cases",
        metavar="A,B",
        help=f"cases to run (default all: {', '.join(c.name for c in CASES)})",
    )
    parser.add_argument(
        "--seeds", type=int, metavar="N", help="seeds per case (default 3; reduced 1)"
    )
    parser.add_argument(
        "--steps", type=int, metavar="N", help="steps per run (default 240; reduced 150)"
    )
    parser.add_argument(
        "--jobs", type=int, default=2, metavar="N", help="runs at a time (default 2)"
    )
    parser.add_argument("--server", metavar="URL", help="a running service (default: start one)")
    parser.add_argument(
        "--out", metavar="DIR", default=".logitwatch/zoo", help="zoo.json and a PNG per run"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a run misses its target")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    scale = REDUCED if args.reduced else ZooScale()
    over = {k: getattr(args, k) for k in ("seeds", "steps") if getattr(args, k) is not None}
    scale = replace(scale, **over)
    cases = cases_named(args.cases.split(",") if args.cases else None)
    result = run_zoo(
        cases, scale, server=args.server, jobs=args.jobs, out=args.out, plots=not args.no_plots
    )
    print_table(result)
    print(f"logitwatch zoo: results and plots in {args.out}")
    return 1 if args.strict and not result.passed else 0
