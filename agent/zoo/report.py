"""Scoring the zoo: when a run diverged, what the service said and when, and a verdict per run.

Divergence (documented in ``logitwatch zoo --help``): the first step of a non-finite loss; or
the first step from which the smoothed loss stays above ln(vocab) to the end; or the first step
from which it stays at least 0.2 nats above the stable control's of the same seed to the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from logitwatch.agent.zoo.cases import CAUSES, ZooCase

__all__ = [
    "GAP_NATS",
    "LEAD_MEDIAN",
    "LEAD_MIN",
    "RunAlerts",
    "Score",
    "divergence",
    "false_alarms",
    "leads",
    "run_alerts",
    "score",
    "smoothed",
]

GAP_NATS = 0.2  # how far above the control's smoothed loss counts as diverged
LEAD_MIN, LEAD_MEDIAN = 30, 40  # steps: every first warning at least this early; the median
BAD = ("warning", "critical")


def smoothed(losses: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps; inf from the first non-finite loss on."""
    out, total, bad = [], 0.0, False
    for i, v in enumerate(losses):
        bad = bad or not math.isfinite(v)
        total += v if not bad else 0.0
        if i >= window and not bad:
            total -= losses[i - window]
        out.append(math.inf if bad else total / min(i + 1, window))
    return out


def _stays(flags: list[bool], start: int, min_len: int) -> int | None:
    """The first index >= start from which every flag is True to the end (at least min_len)."""
    first = None
    for i in range(len(flags) - 1, start - 1, -1):
        if not flags[i]:
            break
        first = i
    if first is None or len(flags) - first < min_len:
        return None
    return first


def divergence(
    losses: list[float],
    control: list[float] | None,
    *,
    vocab: int,
    warmup: int,
    window: int,
) -> tuple[int | None, str]:
    """(step, reason) of the divergence, or (None, "") for a run that did not diverge."""
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            return i, "non-finite loss"
    sm = smoothed(losses, window)
    start = warmup + window  # before that the smoothed loss still holds the warmup
    step = _stays([v > math.log(vocab) for v in sm], start, window)
    if step is not None:
        return step, f"loss above ln({vocab})"
    if control:
        n = min(len(sm), len(control))
        ref = smoothed(control[:n], window)
        step = _stays([sm[i] - ref[i] >= GAP_NATS for i in range(n)], start, window)
        if step is not None:
            return step, f"{GAP_NATS} nats above the control"
    return None, ""


@dataclass
class Score:
    case: str
    kind: str
    seed: int
    run: str
    diverged_at: int | None
    reason: str
    first_warning: dict[str, Any] | None
    first_critical: dict[str, Any] | None
    lead_steps: int | None
    cause_first: bool | None  # the earliest warning-or-worse names the case's real cause
    passed: bool | None  # None: a failing case that neither diverged nor warned (no evidence)
    why: str
    alerts: list[dict[str, Any]] = field(default_factory=list)
    final_loss: float = math.nan
    error: str | None = None


def _first(alerts: list[dict[str, Any]], severities: tuple[str, ...]) -> dict[str, Any] | None:
    found = [a for a in alerts if a.get("severity") in severities]
    return min(found, key=lambda a: (a.get("first_step") or 0, a["rule"])) if found else None


def score(
    case: ZooCase,
    output: Any,
    alerts: list[dict[str, Any]],
    control: list[float] | None,
    *,
    vocab: int,
    warmup: int,
    window: int,
) -> Score:
    """Score one run against its case's target."""
    alerts = sorted(alerts, key=lambda a: (a.get("first_step") or 0, a["rule"]))
    step, reason = divergence(output.losses, control, vocab=vocab, warmup=warmup, window=window)
    warning, critical = _first(alerts, BAD), _first(alerts, ("critical",))
    lead = step - warning["first_step"] if step is not None and warning else None
    bad = [a for a in alerts if a.get("severity") in BAD]
    cause_first = None
    if case.cause is not None and bad:
        named = [a["first_step"] for a in bad if a["rule"] in CAUSES[case.cause]]
        cause_first = bool(named) and min(named) <= bad[0]["first_step"]
    tail = [v for v in output.losses[-window:] if math.isfinite(v)]
    final = sum(tail) / len(tail) if tail else math.nan
    if output.error:
        passed, why = False, f"run failed: {output.error}"
    elif case.kind == "control":
        passed = not bad
        why = "silent" if passed else f"{len(bad)} warning-or-worse alerts"
    elif case.kind == "spike":
        spikes = [a for a in bad if a["rule"] in CAUSES["data"]]
        resolved = bool(spikes) and all(a.get("state") == "resolved" for a in spikes)
        passed = resolved and critical is None and bool(cause_first)
        why = (
            "spike warned and resolved"
            if passed
            else "no spike warning"
            if not spikes
            else "critical alert"
            if critical
            else "spike still firing"
            if not resolved
            else "another rule warned first"
        )
    elif step is None:  # nothing to be early for: a warning naming the cause still counts
        passed = True if cause_first else None if not bad else False
        why = "no divergence at this scale; " + (
            "warned, cause named first"
            if passed
            else "silent"
            if not bad
            else "cause not named first"
        )
    else:
        early = warning is not None and warning["first_step"] < step
        passed = early and bool(cause_first)
        why = (
            "warned before divergence, cause named first"
            if passed
            else "no warning before divergence"
            if not early
            else "another rule warned first"
        )
    return Score(
        case.name,
        case.kind,
        output.seed,
        output.run,
        step,
        reason,
        warning,
        critical,
        lead,
        cause_first,
        passed,
        why,
        alerts,
        final,
        output.error,
    )


def describe(alert: dict[str, Any] | None) -> str:
    """'attn-logit-high L0/h3 @20' for the table."""
    if alert is None:
        return "-"
    labels = alert.get("labels") or {}
    order = sorted(labels, key=lambda k: (k != "layer", k != "head", k))  # layer, head, rest
    short = {"layer": "L", "head": "h"}  # others in full: group=no_decay
    where = "/".join(f"{short.get(k, k + '=')}{labels[k]}" for k in order)
    return f"{alert['rule']}{' ' + where if where else ''} @{alert.get('first_step')}"


@dataclass
class RunAlerts:
    """One run's warning-or-worse alerts, each with the step it went firing (``fired_step``)."""

    case: str
    kind: str
    cause: str | None
    seed: int
    run: str
    steps: int
    diverged_at: int | None
    alerts: list[dict[str, Any]]


def run_alerts(
    scores: list[Score], cases: dict[str, ZooCase], backtest: dict[str, Any] | None
) -> tuple[list[RunAlerts], str]:
    """Each run's alerts from the backtest's replay when there is one, else the live service's
    (``fired_step`` then falls back to ``first_step``); and which of the two it was."""
    replayed = {r["run"]: r for r in (backtest or {}).get("runs", [])}
    out = []
    for s in scores:
        if s.error:
            continue
        if s.run in replayed:
            r = replayed[s.run]
            alerts, steps = r["alerts"], r.get("steps") or 0
        else:
            alerts, steps = s.alerts, 0
        bad = [
            {**a, "fired_step": a.get("fired_step", a.get("first_step"))}
            for a in alerts
            if a.get("severity") in BAD
        ]
        bad.sort(key=lambda a: a["fired_step"] if a["fired_step"] is not None else 1 << 62)
        case = cases[s.case]
        out.append(RunAlerts(s.case, s.kind, case.cause, s.seed, s.run, steps, s.diverged_at, bad))
    return out, "backtest" if replayed else "service"


def false_alarms(runs: list[RunAlerts], steps_per_run: int) -> tuple[int, dict[str, int]]:
    """(healthy steps, {rule: alerts}) over the control runs; a run's steps are its replayed
    step span, or ``steps_per_run`` when it was not replayed."""
    steps, per_rule = 0, {}
    for r in runs:
        if r.kind != "control":
            continue
        steps += r.steps or steps_per_run
        for a in r.alerts:
            per_rule[a["rule"]] = per_rule.get(a["rule"], 0) + 1
    return steps, per_rule


def leads(r: RunAlerts) -> tuple[dict[str, Any] | None, int | None, bool | None]:
    """(first alert, lead in steps before the divergence, the first alert names the cause)."""
    first = r.alerts[0] if r.alerts else None
    if first is None or r.cause is None:
        return first, None, None
    lead = r.diverged_at - first["fired_step"] if r.diverged_at is not None else None
    return first, lead, first["rule"] in CAUSES[r.cause]
