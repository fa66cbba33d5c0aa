"""Pure per-point evaluation of rule conditions over a small JSON-able state dict per series.

The state is what the database keeps between batches (rule_state.state): windows of recent
values, so every service process continues where another left off.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from logitwatch.schedules import ScheduleConfig, lr_at, restart_steps
from logitwatch.service.rules import (
    Growth,
    Jump,
    NonFinite,
    ScheduleDeviation,
    Slope,
    Spike,
    Threshold,
)

__all__ = ["RunContext", "Verdict", "evaluate", "quiet", "reset_windows"]

#: The most points a window keeps, whatever the condition asks (bounds the JSON blob).
MAX_WINDOW = 2000
#: 1.4826·MAD estimates σ for normal data.
MAD_SIGMA = 1.4826


@dataclass(slots=True)
class RunContext:
    """What rules need from the run's registered config."""

    config: dict[str, Any] = field(default_factory=dict)
    schedule: ScheduleConfig | None = None
    warmup_steps: int = 0
    schedule_error: str | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> RunContext:
        config = config if isinstance(config, dict) else {}
        schedule, error = None, None
        raw = config.get("schedule")
        if isinstance(raw, dict):
            try:
                schedule = ScheduleConfig.from_dict(raw)
            except (TypeError, ValueError) as exc:
                error = str(exc)  # a bad schedule disables the schedule rule, never ingest
        ctx = cls(config=config, schedule=schedule, schedule_error=error)
        warmup = schedule.warmup_steps if schedule else ctx.config_value("warmup_steps")
        ctx.warmup_steps = int(warmup) if warmup else 0
        return ctx

    def config_value(self, key: str) -> float | None:
        """``config[key]``, also found one level down (``config["model"][key]``)."""
        candidates = [self.config.get(key)]
        candidates += [v.get(key) for v in self.config.values() if isinstance(v, dict)]
        for v in candidates:
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                return float(v)
        return None

    def restarts(self, lo: int, hi: int) -> list[int]:
        """Scheduled SGDR restarts r with lo < r <= hi."""
        if self.schedule is None:
            return []
        return [r for r in restart_steps(self.schedule, hi) if r > lo]

    def last_restart(self, step: int) -> int | None:
        if self.schedule is None:
            return None
        rs = restart_steps(self.schedule, step)
        return rs[-1] if rs else None


@dataclass(slots=True)
class Verdict:
    active: bool
    value: float
    threshold: float | None


def reset_windows(state: dict[str, Any]) -> None:
    state.pop("w", None)
    state.pop("ws", None)


_OPS = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}


def _threshold(c: Threshold, value: float, ctx: RunContext) -> Verdict | None:
    limit = c.value
    if c.of_config:
        base = ctx.config_value(c.of_config)
        if not base:
            return None  # e.g. no final soft-cap configured: nothing to be near
        limit = c.value * base
    v = abs(value) if c.abs else value
    return Verdict(_OPS[c.op](v, limit), value, limit)


def _growth(c: Growth, state: dict, step: int, value: float) -> Verdict | None:
    # Two flat lists (steps "ws", |values| "w"): min/max over them run in C, and the JSON is small.
    ws: list[int] = state.get("ws") or []
    w: list[float] = state.get("w") or []
    if len(ws) != len(w):
        ws, w = [], []
    cut, i = step - c.over_steps, 0
    while i < len(ws) and ws[i] < cut:
        i += 1
    if i:
        del ws[:i], w[:i]
    v = abs(value)
    verdict = None
    if w:
        if c.ratio > 1:
            base = min(w)
            limit = base * c.ratio
            active = v >= c.min_value and base > 0 and v >= limit
        else:
            base = max(w)
            limit = base * c.ratio
            active = base >= c.min_value and v <= limit
        verdict = Verdict(active, value, limit)
    ws.append(step)
    w.append(v)
    if len(w) > MAX_WINDOW:
        del ws[0], w[0]
    state["ws"], state["w"] = ws, w
    return verdict


def _spike(c: Spike, state: dict, value: float) -> Verdict | None:
    w: list[float] = state.get("w", [])
    verdict = None
    pushed = value
    if len(w) >= c.min_points:
        if c.kind == "mad":
            centre = statistics.median(w)
            spread = MAD_SIGMA * statistics.median(abs(x - centre) for x in w)
        else:
            centre = statistics.fmean(w)
            spread = statistics.pstdev(w, centre)
        # A perfectly flat window would make any wiggle a spike; floor the spread.
        spread = max(spread, 1e-9 * abs(centre), 1e-12)
        margin = max(c.sigmas * spread, c.min_rel * abs(centre))
        hi, lo = centre + margin, centre - margin
        up = c.direction in ("up", "both") and value > hi
        down = c.direction in ("down", "both") and value < lo
        verdict = Verdict(up or down, value, hi if c.direction != "down" else lo)
        # Winsorise what enters the window so one spike does not mask the next.
        pushed = min(max(value, lo), hi)
    w.append(pushed)
    state["w"] = w[-c.window :]
    return verdict


def _slope(c: Slope, state: dict, step: int, value: float) -> Verdict | None:
    w = [p for p in state.get("w", []) if p[0] > step - c.window_steps]
    v = abs(value) if c.abs else value
    w.append([step, v])
    state["w"] = w[-MAX_WINDOW:]
    if len(w) < c.min_points:
        return None
    xs = [p[0] for p in w]
    ys = [p[1] for p in w]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return Verdict(slope > c.above and abs(v) >= c.min_value, slope, c.above)


def _jump(c: Jump, state: dict, value: float) -> Verdict | None:
    w: list[float] = state.get("w", [])
    verdict = None
    if len(w) >= c.min_points:
        med = statistics.median(w)
        if med > 0:
            verdict = Verdict(value >= c.ratio * med, value, c.ratio * med)
    w.append(value)
    state["w"] = w[-c.window :]
    return verdict


def _schedule(c: ScheduleDeviation, step: int, value: float, ctx: RunContext) -> Verdict | None:
    if ctx.schedule is None:
        return None
    # The LR read from the optimizer may belong to the step before or after the one it is
    # reported with, depending on where the loop calls scheduler.step(): allow one step of slack.
    expected = [lr_at(ctx.schedule, s) for s in (step - 1, step, step + 1) if s >= 0]
    dev = min(abs(value - e) / e for e in expected)
    here = lr_at(ctx.schedule, step)
    return Verdict(dev > c.tolerance, value, here)


def evaluate(cond: Any, state: dict[str, Any], step: int, value: float, ctx: RunContext):
    """One point through one condition; ``None`` when there is not yet enough data to judge.

    Non-finite values are judged only by threshold and nonfinite conditions and never enter a
    window (windows must stay JSON-able, and one NaN would poison a mean).
    """
    if isinstance(cond, NonFinite):
        return Verdict(not math.isfinite(value), value, None)
    if isinstance(cond, Threshold):
        return _threshold(cond, value, ctx)
    if not math.isfinite(value):
        return None
    if isinstance(cond, Growth):
        return _growth(cond, state, step, value)
    if isinstance(cond, Spike):
        return _spike(cond, state, value)
    if isinstance(cond, Slope):
        return _slope(cond, state, step, value)
    if isinstance(cond, Jump):
        return _jump(cond, state, value)
    if isinstance(cond, ScheduleDeviation):
        return _schedule(cond, step, value, ctx)
    return None  # absent: judged by the periodic check


def quiet(cond: Any, values: list[float], ctx: RunContext) -> bool:
    """True when a stateless condition holds on none of ``values`` (the common case, skipped
    without walking the points one by one); False when it might, or is not stateless."""
    if isinstance(cond, NonFinite):
        return all(math.isfinite(v) for v in values)
    if isinstance(cond, Threshold):
        limit = cond.value
        if cond.of_config:
            base = ctx.config_value(cond.of_config)
            if not base:
                return True
            limit = cond.value * base
        op = _OPS[cond.op]
        if cond.abs:
            return not any(op(abs(v), limit) for v in values)
        return not any(op(v, limit) for v in values)
    return False
