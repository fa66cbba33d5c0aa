"""Train the instability zoo through the real agent into a service, and score it.

Each case (stable controls, failing configurations, corrupted batches) runs for several seeds in
worker processes; the service's alerts are read back and set against when each run diverged.
Each run's metrics file is then replayed by ``logitwatch backtest`` (a subprocess), labelled
with those divergence steps and controls: the lead-time and false-alarm tables read the replay.

Divergence: a non-finite loss; or a trailing-mean loss that stays above ln(vocab) to the end; or
one that stays at least 0.2 nats above the stable control of the same seed to the end (at this
scale runs without QK-norm stall rather than blow up, so the gap is what shows it).
"""

from __future__ import annotations

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from logitwatch.agent.zoo.cases import CASES, ZooCase, ZooScale
from logitwatch.agent.zoo.report import Score, score
from logitwatch.agent.zoo.runs import RunOutput, run_case
from logitwatch.client import Alert, ApiClient, NotReady

__all__ = ["ZooResult", "rescore", "run_zoo"]


@dataclass
class ZooResult:
    scale: ZooScale
    scores: list[Score]
    outputs: list[RunOutput]
    seconds: float
    server: str
    # `logitwatch backtest --json` over the runs' metrics files, the zoo's divergence steps and
    # controls given as labels; None when it could not run (backtest_error says why).
    backtest: dict[str, Any] | None = None
    backtest_error: str | None = None

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
        metrics = (
            Path(out) / "metrics"
            if out is not None
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lwzoo-m-")))
        )
        if metrics.is_dir():  # a file per run of this zoo only: backtest reads the folder
            for old in metrics.glob("*.jsonl"):
                old.unlink()
        work = [(c, seed) for seed in range(scale.seeds) for c in cases]
        work.sort(key=lambda cs: not _slow(cs[0]))  # slowest first
        ctx = multiprocessing.get_context("spawn")  # fork and torch's threads do not mix
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = [
                pool.submit(run_case, c, scale, seed, url, prefix, str(metrics)) for c, seed in work
            ]
            outputs = [f.result() for f in futures]
        alerts = _alerts(url, [o.run for o in outputs])
        scores = _score_all(cases, scale, outputs, alerts)
        result = ZooResult(scale, scores, outputs, time.perf_counter() - start, url)
        result.backtest, result.backtest_error = _backtest(metrics, scores)
    if out is not None:
        _write(result, Path(out), plots)
    return result


def rescore(out: str | os.PathLike[str]) -> ZooResult:
    """The zoo written to ``out`` (zoo.json and metrics/), its backtest run again: the rules as
    they are now, on the same runs, without training again."""
    path = Path(out) / "zoo.json"
    if not path.is_file():
        raise ValueError(f"--rescore: no zoo.json in {str(out)!r}; run the zoo with --out first.")
    data = json.loads(path.read_text())
    scores = [Score(**s) for s in data["scores"]]
    outputs = [RunOutput(**o) for o in data["runs"]]
    result = ZooResult(ZooScale(**data["scale"]), scores, outputs, data["seconds"], "")
    result.backtest, result.backtest_error = _backtest(Path(out) / "metrics", scores)
    return result


def _slow(case: ZooCase) -> bool:
    over = case.overrides
    return bool(over.get("bf16") or over.get("fp16") or over.get("preset"))


def _backtest(metrics: Path, scores: list[Score]) -> tuple[dict[str, Any] | None, str | None]:
    """Replay the metrics files through the service's rule engine (``logitwatch backtest``, a
    subprocess: the agent never imports the service), labelled with the zoo's verdicts."""
    files = sorted(metrics.glob("*.jsonl"))
    if not files:
        return None, "no metrics files were written"
    cmd = [sys.executable, "-m", "logitwatch", "backtest", "--json", "--quiet", str(metrics)]
    for s in scores:
        if s.error:
            continue
        if s.kind == "control":
            cmd += ["--healthy", s.run]
        elif s.diverged_at is not None:
            cmd += ["--diverged", f"{s.run}={s.diverged_at}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"backtest did not run: {exc}"
    if done.returncode != 0:
        return None, f"backtest failed ({done.returncode}): {done.stderr.strip()[-500:]}"
    try:
        return json.loads(done.stdout), None
    except json.JSONDecodeError as exc:
        return None, f"backtest printed no JSON: {exc}"


def _score_all(cases, scale, outputs, alerts) -> list[Score]:
    from logitwatch.agent.reference.train_config import TrainConfig

    by_name = {c.name: c for c in cases}
    control = {o.seed: o.losses for o in outputs if o.case == "stable" and not o.error}
    probe = TrainConfig(**scale.train_overrides())
    warmup = probe.schedule_config().warmup_steps
    vocab = probe.decoder_config().vocab_size
    window = max(10, scale.steps // 15)
    scores = []
    for o in outputs:
        # A control is judged on its own loss: other loops and presets are other models.
        ref = None if by_name[o.case].kind == "control" else control.get(o.seed)
        scores.append(
            score(by_name[o.case], o, alerts[o.run], ref, vocab=vocab, warmup=warmup, window=window)
        )
    order = {c.name: i for i, c in enumerate(cases)}
    return sorted(scores, key=lambda s: (order[s.case], s.seed))


def _alerts(url: str, runs: list[str]) -> dict[str, list[Alert]]:
    with ApiClient(url, timeout=30) as api:
        return {run: api.alerts(run=run, limit=10_000) for run in runs}


@contextlib.contextmanager
def _local_service() -> Iterator[str]:
    """``logitwatch serve`` on a free loopback port with a throwaway SQLite file."""
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
            try:
                with ApiClient(url) as api:
                    api.wait_ready(60, process=proc, interval=0.1)
            except NotReady:
                text = (Path(tmp) / "serve.log").read_text(errors="replace")
                raise RuntimeError(f"zoo: the service did not start:\n{text}") from None
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
        "backtest": result.backtest,
        "backtest_error": result.backtest_error,
    }
    (out / "zoo.json").write_text(json.dumps(data, indent=1, default=str))
    if plots:
        from logitwatch.agent.zoo.plot import plot_run

        by_run = {s.run: s for s in result.scores}
        control = {o.seed: o for o in result.outputs if o.case == "stable"}
        for o in result.outputs:
            plot_run(o, by_run[o.run], control.get(o.seed), out / f"{o.case}-s{o.seed}.png")
