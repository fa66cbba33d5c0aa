"""Stored runs for a backtest: read back from a service over REST, or from a metrics file.

A run is replayed as the events the service saw: its config, then its batches in order.
A metrics file is either the agent's JSON lines (``FileSink``: a header, run registrations and
one batch per line, replayed as written) or ``logitwatch train --metrics-out`` lines (one
object per step, made into one batch per step). Points read from a service are made into one
batch per (segment, step), in that order: the batch boundaries the agent used are not stored.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitwatch.client import ApiClient
from logitwatch.protocol import Batch, ProtocolError, Series, check_metric_name, decode_batch

__all__ = ["STEP_LINE_METRICS", "StoredRun", "from_file", "from_service", "select_runs"]

#: ``train --metrics-out`` keys and the metrics the agent reports them as.
STEP_LINE_METRICS: dict[str, tuple[str, dict[str, str]]] = {
    "loss": ("loss", {}),
    "loss_z": ("loss.z", {}),
    "lr": ("lr", {"group": "0"}),
    "grad_norm": ("grad.norm", {}),
    "tokens_per_s": ("throughput.tokens_per_s", {}),
}
_CLIENT = "backtest"


@dataclass
class StoredRun:
    """One run to replay: its registered config and its batches, in the order to send them."""

    name: str
    origin: str  # the file, or the service URL
    config: dict[str, Any] = field(default_factory=dict)
    tags: Any = None
    batches: list[Batch] = field(default_factory=list)

    def loss(self) -> list[tuple[int, int, float]]:
        """(segment, step, value) of the unlabelled ``loss`` series, in replay order."""
        return [
            (b.segment, step, value)
            for b in self.batches
            for s in b.series
            if s.metric == "loss" and not s.labels
            for step, value in zip(s.steps, s.values, strict=True)
        ]

    def step_span(self) -> tuple[int, int] | None:
        """(first, last) step over every point, or None for a run without points."""
        lo = [min(s.steps) for b in self.batches for s in b.series if len(s.steps)]
        hi = [max(s.steps) for b in self.batches for s in b.series if len(s.steps)]
        return (min(lo), max(hi)) if lo else None


def _by_step(points: dict[tuple[int, int], list[Series]]) -> list[Batch]:
    """One batch per (segment, step), in that order."""
    return [
        Batch(client=_CLIENT, seq=seq, segment=seg, series=series)
        for seq, ((seg, _), series) in enumerate(sorted(points.items()))
    ]


def _step_line(obj: dict[str, Any], where: str) -> tuple[int, list[Series]]:
    step = obj.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{where}: 'step' must be a non-negative integer, not {step!r}")
    series = []
    for key, value in obj.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        metric, labels = STEP_LINE_METRICS.get(key, (key, {}))
        try:
            check_metric_name(metric, f"{where}.{key}")
        except ProtocolError:
            continue  # a column that is no metric name (a note, a timestamp): not replayed
        series.append(Series(metric, dict(labels), [step], [float(value)]))
    return step, series


def from_file(path: str | Path) -> StoredRun:
    """A run from a metrics file; ValueError naming the file and line when it cannot be read."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    run = StoredRun(name=path.stem, origin=str(path))
    steps: dict[tuple[int, int], list[Series]] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError:
            if lineno == len(lines):
                continue  # the last line cut by a crash mid-write, as `logitwatch sync` skips it
            raise ValueError(f"{where}: not a JSON line") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        if "series" in obj:
            try:
                run.batches.append(decode_batch(line, "application/json"))
            except ProtocolError as exc:
                raise ValueError(f"{where}: {exc}") from None
        elif "step" in obj:
            step, series = _step_line(obj, where)
            steps.setdefault((0, step), []).extend(series)
        elif "config" in obj or "tags" in obj:
            run.config = obj.get("config") or {}
            run.tags = obj.get("tags")
        if isinstance(obj.get("run"), str) and lineno == 1:
            run.name = obj["run"]
    if steps and run.batches:
        raise ValueError(f"{path}: mixes agent batches and per-step lines; give one kind a file")
    if steps:
        run.batches = _by_step(steps)
    return run


def select_runs(names: list[str], patterns: list[str]) -> list[str]:
    """The names matching any pattern (a name or a glob such as 'zoo-*'), in their order;
    ValueError for a pattern that matches nothing."""
    chosen = []
    for pattern in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise ValueError(f"no run on the service matches {pattern!r}")
        chosen += [n for n in hit if n not in chosen]
    return chosen


def _float(v: Any) -> float:
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(v, v)


def from_service(
    api: ApiClient, name: str, *, progress: Callable[[int, int], None] | None = None
) -> StoredRun:
    """Every point of every metric of run ``name`` (every segment), read over REST."""
    info = api.run(name)
    run = StoredRun(name=name, origin=api.base_url, config=info.get("config") or {},
                    tags=info.get("tags"))  # fmt: skip
    metrics = sorted({s["metric"] for s in api.series(name)})
    steps: dict[tuple[int, int], list[Series]] = {}
    for i, metric in enumerate(metrics):
        doc = api.metric(name, metric, segments="all", times=False)
        for s in doc["series"]:
            for step, value in zip(s["steps"], s["values"], strict=True):
                one = Series(metric, dict(s["labels"]), [step], [_float(value)])
                steps.setdefault((s["segment"], step), []).append(one)
        if progress is not None:
            progress(i + 1, len(metrics))
    run.batches = _by_step(steps)
    return run
