"""Pure per-point evaluation of rule conditions over a small JSON-able state dict per series.

The state is what the database keeps between batches (rule_state.state): windows of recent
values, so every service process continues where another left off.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from logitwatch.schedules import ScheduleConfig, lr_at, restart_steps
from logitwatch.service.rules.model import (
    Growth,
    Jump,
    NonFinite,
    ScheduleDeviation,
    Slope,
    Spike,
    Threshold,
)

__all__ = [
    "Bounds",
    "BoundsColumns",
    "RunContext",
    "Verdict",
    "batch_bounds",
    "bounds_columns",
    "bounds_flat",
    "evaluate",
    "fast_path",
    "quiet",
    "quiet_many",
    "reset_windows",
]

#: The most points a window keeps, whatever the condition asks (bounds the JSON blob).
MAX_WINDOW = 2000
#: 1.4826·MAD estimates σ for normal data.
MAD_SIGMA = 1.4826
#: Points whose median is a spike rule's centre.
_CENTRE_POINTS = 20


@dataclass(slots=True)
class RunContext:
    """What rules need from the run's registered config."""

    config: dict[str, Any] = field(default_factory=dict)
    schedule: ScheduleConfig | None = None
    warmup_steps: int = 0
    schedule_error: str | None = None
    #: The config gives the warmup (``schedule`` or a top-level ``warmup_steps``); else the
    #: service infers it from the run's lr series (warmup.py) before each batch.
    warmup_declared: bool = False

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
        # Top level only: a nested one (Hugging Face's training_args.warmup_steps) may be 0
        # while warmup_ratio sets the real warmup; the lr series then tells.
        warmup = schedule.warmup_steps if schedule else config.get("warmup_steps")
        number = isinstance(warmup, int | float) and not isinstance(warmup, bool)
        if number and math.isfinite(warmup) and warmup >= 0:
            ctx.warmup_steps, ctx.warmup_declared = int(warmup), True
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
    #: What was compared with the threshold (|value|, a slope, ...) and on which side of it
    #: the condition holds: what a resolve margin is measured on (NaN: no margin applies).
    measured: float = math.nan
    above: bool = True


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
    return Verdict(_OPS[c.op](v, limit), value, limit, v, c.op[0] == ">")


def _must_settle(c: Growth, state: dict, ctx: RunContext) -> bool:
    """A run without warmup is judged only once the series has settled (see model.Growth)."""
    return c.settle and ctx.warmup_steps == 0 and not state.get("settled")


def _growth(c: Growth, state: dict, step: int, value: float, ctx: RunContext) -> Verdict | None:
    # The window is a monotonic deque (steps "ws", |values| "w"): for a rise only the points
    # smaller than every later one can still be the minimum, so the front is the minimum
    # (for a drop, the maximum), each point costs O(1), and the JSON stays a few numbers.
    # "from" is the series' first step, "settled" set once it has settled.
    ws: list[int] = state.get("ws") or []
    w: list[float] = state.get("w") or []
    if len(ws) != len(w):
        ws, w = [], []
    cut = step - c.over_steps
    while ws and ws[0] < cut:
        del ws[0], w[0]
    v = abs(value)
    verdict = None
    rise = c.ratio > 1
    settling = _must_settle(c, state, ctx)
    if settling:
        state.setdefault("from", step)
    if w:
        base = w[0]
        # Settled: less than sqrt(ratio) beyond the baseline (half-way to firing, in log
        # terms), so that noise around the ratio itself does not count as settling.
        half = math.sqrt(c.ratio) * base
        if rise:
            limit = c.ratio * max(base, c.min_value)
            active = limit > 0 and v >= limit
            moving = v >= half
        else:
            limit = c.ratio * base
            active = base >= c.min_value and v <= limit
            moving = v <= half
        if settling:
            if moving or step - state["from"] < c.over_steps:
                active = False  # still the fast change after initialisation: no baseline yet
            else:
                state["settled"] = True
                del state["from"]
        verdict = Verdict(active, value, limit, v, rise)
    while w and (w[-1] >= v if rise else w[-1] <= v):
        del ws[-1], w[-1]
    ws.append(step)
    w.append(v)
    state["ws"], state["w"] = ws, w
    return verdict


def _growth_window(c: Growth, state: dict, steps: np.ndarray, values: np.ndarray) -> None:
    """The deque of ``_growth`` after all of ``values`` (finite, |.|), computed in one go."""
    if len(steps) and steps[0] < steps[-1] - c.over_steps:
        # the old window and the new points before the last over_steps all fall out
        i = int(np.searchsorted(steps, steps[-1] - c.over_steps))
        S, V = steps[i:], values[i:]
    else:
        S = np.concatenate([np.asarray(state.get("ws") or [], dtype=np.int64), steps])
        V = np.concatenate([np.asarray(state.get("w") or [], dtype=np.float64), values])
    if len(S) != len(V) or not len(V):
        return
    keep = np.empty(len(V), dtype=bool)
    keep[-1] = True
    if c.ratio > 1:  # keep the points smaller than everything after them
        after = np.minimum.accumulate(V[::-1])[::-1]
        np.less(V[:-1], after[1:], out=keep[:-1])
    else:
        after = np.maximum.accumulate(V[::-1])[::-1]
        np.greater(V[:-1], after[1:], out=keep[:-1])
    keep &= S[-1] - c.over_steps <= S
    state["ws"], state["w"] = S[keep].tolist(), V[keep].tolist()


def _median(a: np.ndarray) -> float:
    """statistics.median of ``a``, from a partition rather than a sort (same float result:
    the middle value, or the two middle ones added and halved)."""
    h = len(a) // 2
    if len(a) % 2:
        return float(np.partition(a, h)[h])
    p = np.partition(a, (h - 1, h))
    return (float(p[h - 1]) + float(p[h])) / 2


def _spike(c: Spike, state: dict, value: float) -> Verdict | None:
    w: list[float] = state.get("w", [])
    verdict = None
    pushed = value
    if len(w) >= c.min_points:
        if c.kind == "mad":
            # Centre: the recent median, so a falling loss is not judged against its older,
            # higher values. Spread: the MAD of first differences (/sqrt 2), which measures the
            # noise around the trend and not the trend itself.
            a = np.array(w)
            centre = _median(a[-_CENTRE_POINTS:])
            d = np.diff(a)
            md = _median(d)
            spread = MAD_SIGMA * _median(np.abs(d - md)) / math.sqrt(2)
        else:
            centre = statistics.fmean(w)
            spread = statistics.pstdev(w, centre)
        # A perfectly flat window would make any wiggle a spike; floor the spread.
        spread = max(spread, 1e-9 * abs(centre), 1e-12)
        margin = max(c.sigmas * spread, c.min_rel * abs(centre))
        hi, lo = centre + margin, centre - margin
        up = c.direction in ("up", "both") and value > hi
        down = c.direction in ("down", "both") and value < lo
        verdict = Verdict(
            up or down, value, hi if c.direction != "down" else lo, value, c.direction != "down"
        )
        # Winsorise what enters the window so one spike does not mask the next.
        pushed = min(max(value, lo), hi)
    w.append(pushed)
    state["w"] = w[-c.window :]
    return verdict


def _spikes_quiet(c: Spike, state: dict, values: list[float]) -> bool:
    """``_spike`` over ``values`` when none is a spike: True, and the window moved. A value
    within ``min_rel`` of the centre is no spike whatever the spread (the margin is at least
    that) and enters the window as it is, so only the centre is needed; a value beyond goes
    through ``_spike``. False, and the state untouched, as soon as one is a spike."""
    w = state.get("w", [])
    if type(w) is not list or (w and set(map(type, w)) != _FLOATS):
        return False  # a window left by another kind of rule: see run_rule
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return True  # _spike never sees a value that is not finite
    w = list(w)
    mad = c.kind == "mad"
    for value in finite:
        if len(w) >= c.min_points:
            if mad:
                tail = sorted(w[-_CENTRE_POINTS:])
                h = len(tail) // 2
                centre = tail[h] if len(tail) % 2 else (tail[h - 1] + tail[h]) / 2
            else:
                centre = statistics.fmean(w)
            near = c.min_rel * abs(centre)
            if not centre - near <= value <= centre + near:
                probe = {"w": w}
                verdict = _spike(c, probe, value)
                if verdict.active:
                    return False
                w = probe["w"]
                continue
        w.append(value)
        if len(w) > c.window:
            del w[: len(w) - c.window]
    state["w"] = w
    return True


_FLOATS = {float}


def _on_schedule(c: ScheduleDeviation, steps: list, values: list, ctx: RunContext) -> bool:
    """No point off the schedule (``_schedule``, which keeps no state): each step's LR
    computed once rather than three times, as its own and its neighbours' slack."""
    if ctx.schedule is None:
        return True
    lr: dict[int, float] = {}
    for step, value in zip(steps, values, strict=True):
        if not math.isfinite(value):
            continue
        expected = []
        for s in (step - 1, step, step + 1):
            if s >= 0:
                e = lr.get(s)
                if e is None:
                    e = lr[s] = lr_at(ctx.schedule, s)
                if not e:
                    return False  # as _schedule does, point by point
                expected.append(e)
        if min(abs(value - e) / e for e in expected) > c.tolerance:
            return False
    return True


def _slope(c: Slope, state: dict, step: int, value: float) -> Verdict | None:
    w = [p for p in state.get("w", []) if p[0] > step - c.window_steps]
    v = abs(value) if c.abs else value
    w.append([step, v])
    state["w"] = w[-MAX_WINDOW:]
    if len(w) < c.min_points:
        return None
    if abs(v) < c.min_value and "on" not in state and "open" not in state:
        return None  # inactive whatever the slope, and nothing holds to resolve: no verdict
    xs = [p[0] for p in w]
    ys = [p[1] for p in w]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return Verdict(slope > c.above and abs(v) >= c.min_value, slope, c.above, slope)


def _jump(c: Jump, state: dict, value: float) -> Verdict | None:
    w: list[float] = state.get("w", [])
    verdict = None
    if len(w) >= c.min_points:
        med = statistics.median(w)
        if med > 0:
            verdict = Verdict(value >= c.ratio * med, value, c.ratio * med, value)
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
        return _growth(cond, state, step, value, ctx)
    if isinstance(cond, Spike):
        return _spike(cond, state, value)
    if isinstance(cond, Slope):
        return _slope(cond, state, step, value)
    if isinstance(cond, Jump):
        return _jump(cond, state, value)
    if isinstance(cond, ScheduleDeviation):
        return _schedule(cond, step, value, ctx)
    return None  # absent: judged by the periodic check


def fast_path(
    cond: Any,
    state: dict,
    steps: np.ndarray,
    values: np.ndarray,
    ctx: RunContext,
    bounds: Bounds | None = None,
) -> bool:
    """Handle a run of points in one go when none of them can satisfy ``cond`` (the common
    case: a level nobody reached); True when done, False when they must go one by one.
    The caller only asks when no alert is open or pending for this rule and series.
    ``bounds``, when given, hold for a superset of ``values``."""
    if bounds is not None and quiet(cond, bounds, ctx):
        return True
    if isinstance(cond, Spike):
        return _spikes_quiet(cond, state, values.tolist())
    if isinstance(cond, ScheduleDeviation):
        return _on_schedule(cond, steps.tolist(), values.tolist(), ctx)
    small = len(values) <= _SMALL
    if isinstance(cond, Growth) and bounds is not None and bounds.finite and not small:
        if not _growth_quiet(cond, state, bounds.finite_abs_hi, ctx):
            return False
        _growth_window(cond, state, steps, np.abs(values))
        return True
    if small:
        return _fast_small(cond, state, steps.tolist(), values.tolist(), ctx)
    if isinstance(cond, NonFinite):
        return bool(np.isfinite(values).all())
    if isinstance(cond, Threshold):
        limit = _limit(cond, ctx)
        if limit is None:
            return True
        v = np.abs(values) if cond.abs else values
        with np.errstate(invalid="ignore"):
            return not bool(_OPS[cond.op](v, limit).any())
    if isinstance(cond, Growth):
        ok = np.isfinite(values)
        v = np.abs(values[ok])
        if not len(v):
            return True
        if not _growth_quiet(cond, state, float(v.max()), ctx):
            return False
        _growth_window(cond, state, steps[ok], v)
        return True
    return False


@dataclass(slots=True)
class Bounds:
    """Extremes of one series' new points (NaN left out; ±inf kept), for verdicts that no
    point of the series can reach: a quiet threshold needs no per-series numpy call."""

    hi: float  # max value (-inf when all NaN)
    lo: float  # min value (+inf when all NaN)
    abs_hi: float  # max |value|
    abs_lo: float  # min |value|
    finite: bool  # every value finite
    finite_abs_hi: float  # max |value| over finite values (0 when none)


@dataclass(slots=True)
class BoundsColumns:
    """The Bounds of many arrays, field by field (one numpy array each); ``first`` holds each
    array's first value."""

    hi: np.ndarray
    lo: np.ndarray
    abs_hi: np.ndarray
    abs_lo: np.ndarray
    finite: np.ndarray
    finite_abs_hi: np.ndarray
    first: np.ndarray

    def at(self, i: int) -> Bounds:
        return Bounds(
            float(self.hi[i]), float(self.lo[i]), float(self.abs_hi[i]), float(self.abs_lo[i]),
            bool(self.finite[i]), float(self.finite_abs_hi[i]),
        )  # fmt: skip


def bounds_columns(values: list[np.ndarray]) -> BoundsColumns:
    """Bounds of each non-empty array, with a handful of numpy calls for the whole batch."""
    return bounds_flat(np.concatenate(values), np.array([len(v) for v in values], np.intp))


def bounds_flat(v: np.ndarray, lens: np.ndarray) -> BoundsColumns:
    """``bounds_columns`` of arrays given end to end (``lens`` > 0 values each)."""
    nan = np.isnan(v)
    fin = np.isfinite(v)
    a = np.abs(v)
    if len(v) == len(lens):  # one point each (a fleet's report): no reductions
        top, bottom = np.where(nan, -np.inf, v), np.where(nan, np.inf, v)
        atop, abottom = np.where(nan, -np.inf, a), np.where(nan, np.inf, a)
        return BoundsColumns(top, bottom, atop, abottom, fin, np.where(fin, a, 0.0), v)
    starts = np.cumsum(lens) - lens
    return BoundsColumns(
        np.maximum.reduceat(np.where(nan, -np.inf, v), starts),
        np.minimum.reduceat(np.where(nan, np.inf, v), starts),
        np.maximum.reduceat(np.where(nan, -np.inf, a), starts),
        np.minimum.reduceat(np.where(nan, np.inf, a), starts),
        np.logical_and.reduceat(fin, starts),
        np.maximum.reduceat(np.where(fin, a, 0.0), starts),
        v[starts],
    )


def batch_bounds(values: list[np.ndarray]) -> list[Bounds]:
    """Bounds of each non-empty array (see bounds_columns)."""
    cols = bounds_columns(values)
    return [cols.at(i) for i in range(len(values))]


def quiet(cond: Any, b: Bounds, ctx: RunContext) -> bool:
    """True when no point within ``b`` can satisfy a stateless ``cond`` (threshold, nonfinite):
    the series needs no further look. False means "maybe": take the per-point path."""
    if isinstance(cond, NonFinite):
        return b.finite
    if isinstance(cond, Threshold):
        limit = _limit(cond, ctx)
        if limit is None:
            return True
        hi, lo = (b.abs_hi, b.abs_lo) if cond.abs else (b.hi, b.lo)
        return not _OPS[cond.op](hi if cond.op[0] == ">" else lo, limit)
    return False


def quiet_many(cond: Any, b: BoundsColumns, idx: np.ndarray, ctx: RunContext) -> np.ndarray:
    """``quiet`` for the arrays at ``idx`` of ``b`` at once (thresholds and nonfinite only)."""
    if isinstance(cond, NonFinite):
        return b.finite[idx]
    limit = _limit(cond, ctx)
    if limit is None:
        return np.ones(len(idx), bool)
    hi, lo = (b.abs_hi, b.abs_lo) if cond.abs else (b.hi, b.lo)
    return ~_OPS[cond.op]((hi if cond.op[0] == ">" else lo)[idx], limit)


#: Below this many points, plain Python beats numpy's per-call overhead.
_SMALL = 32


def _fast_small(cond: Any, state: dict, steps: list, values: list, ctx: RunContext) -> bool:
    if isinstance(cond, NonFinite):
        return all(math.isfinite(v) for v in values)
    if isinstance(cond, Threshold):
        limit = _limit(cond, ctx)
        if limit is None:
            return True
        op = _OPS[cond.op]
        return not any(op(abs(v) if cond.abs else v, limit) for v in values)
    if isinstance(cond, Growth):
        pts = [(s, abs(v)) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
        if not pts:
            return True
        if not _growth_quiet(cond, state, max(v for _, v in pts), ctx):
            return False
        for s, v in pts:  # no verdict can hold: only the window moves
            _growth(cond, state, s, v, ctx)
        return True
    return False


def _limit(cond: Threshold, ctx: RunContext) -> float | None:
    if not cond.of_config:
        return cond.value
    base = ctx.config_value(cond.of_config)
    return cond.value * base if base else None


def _growth_quiet(cond: Growth, state: dict, top: float, ctx: RunContext) -> bool:
    """No point can hold: a rise fires only at |value| >= ratio x min_value, a drop only from
    a window maximum >= min_value. A series not yet settled goes point by point (the point
    that settles it must be found)."""
    if _must_settle(cond, state, ctx):
        return False
    if cond.ratio > 1:
        return cond.min_value > 0 and top < cond.ratio * cond.min_value
    return max(top, max(state.get("w") or [0.0])) < cond.min_value
