"""Backtest figures from replayed alerts: firing steps, lead times, false alarms and flaps per rule.

A run is *diverged* at the step the user gave, or else at its first non-finite ``loss``;
*healthy* when the user said so; otherwise *unlabelled* (its alerts count only in ``runs_fired``
and ``flaps``). The lead time is the divergence step minus the rule's first ``fired_step`` on
that run (negative: it fired after). A false alarm is an alert on a healthy run; rates are per
1,000 steps of the healthy runs' step spans. A flap is a fire→resolve→fire cycle: each alert
of a (run, rule, series) after its first.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from logitwatch.service.rules.backtest.sources import StoredRun
from logitwatch.service.rules.model import Rule

__all__ = [
    "ANY",
    "SEVERITIES",
    "RunResult",
    "detect_divergence",
    "label_run",
    "rule_figures",
    "score",
]

SEVERITIES = ("info", "warning", "critical")
ANY = "(any rule)"  # the row of the earliest alert of any rule
_ALERT_KEYS = ("rule", "severity", "metric", "labels", "fired_step", "resolved_step",
               "first_step", "last_step", "value", "threshold")  # fmt: skip


@dataclass
class RunResult:
    """One replayed run: its label, divergence step, step span and alerts."""

    run: str
    origin: str
    status: str  # "diverged" | "healthy" | "unlabelled"
    diverged_at: int | None
    reason: str
    first_step: int | None
    last_step: int | None
    alerts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Training steps the run spans (its reports may be every few steps)."""
        if self.first_step is None or self.last_step is None:
            return 0
        return self.last_step - self.first_step + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "origin": self.origin,
            "status": self.status,
            "diverged_at": self.diverged_at,
            "reason": self.reason,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "steps": self.steps,
            "alerts": [{k: a.get(k) for k in _ALERT_KEYS} for a in self.alerts],
        }


def detect_divergence(run: StoredRun) -> int | None:
    """The step of the run's first non-finite ``loss`` (in replay order), or None."""
    return next((step for _, step, v in run.loss() if not math.isfinite(v)), None)


def label_run(
    run: StoredRun, alerts: list[dict[str, Any]], *, diverged: dict[str, int], healthy: set[str]
) -> RunResult:
    """The run's result, labelled by the user's word first, then by a non-finite loss."""
    span = run.step_span()
    first, last = span if span else (None, None)
    if run.name in diverged:
        status, at, reason = "diverged", diverged[run.name], "given"
    elif run.name in healthy:
        status, at, reason = "healthy", None, "given"
    elif (at := detect_divergence(run)) is not None:
        status, reason = "diverged", "non-finite loss"
    else:
        status, reason = "unlabelled", ""
    return RunResult(run.name, run.origin, status, at, reason, first, last, alerts)


def _labels(a: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((a.get("labels") or {}).items()))


def _fired(a: dict[str, Any]) -> int:
    # Alerts stored before fired_step existed fall back to first_step, as Alertmanager's do.
    return a["fired_step"] if a.get("fired_step") is not None else a["first_step"]


def rule_figures(name: str, severity: str, runs: list[RunResult], healthy_steps: int) -> dict:
    """The figures of one rule (or of every rule together, for ``ANY``)."""
    fired_step: dict[str, int | None] = {}
    lead: dict[str, int] = {}
    false_alarms = flaps = fired_runs = 0
    for r in runs:
        mine = [a for a in r.alerts if name in (ANY, a["rule"])]
        fired_runs += bool(mine)
        first = min((_fired(a) for a in mine), default=None)
        if r.status == "diverged":
            fired_step[r.run] = first
            if first is not None:
                lead[r.run] = r.diverged_at - first
        elif r.status == "healthy":
            false_alarms += len(mine)
        episodes = Counter((a["rule"], a["metric"], _labels(a)) for a in mine)
        flaps += sum(n - 1 for n in episodes.values())
    leads = sorted(lead.values())
    per_1k = 1000 * false_alarms / healthy_steps if healthy_steps else None
    return {
        "rule": name,
        "severity": severity,
        "runs_fired": fired_runs,
        "fired_step": fired_step,
        "lead_steps": lead,
        "lead_median": statistics.median(leads) if leads else None,
        "lead_min": leads[0] if leads else None,
        "false_alarms": false_alarms,
        "false_alarms_per_1k": per_1k,
        "flaps": flaps,
    }


def score(
    rules: list[Rule], runs: list[RunResult], *, min_severity: str = "warning"
) -> dict[str, Any]:
    """The backtest document (the ``--json`` output; its schema is in ``backtest --help``)."""
    rank = SEVERITIES.index(min_severity)
    kept = [
        replace(r, alerts=[a for a in r.alerts if SEVERITIES.index(a["severity"]) >= rank])
        for r in runs
    ]
    healthy_steps = sum(r.steps for r in kept if r.status == "healthy")
    names = {r.name: r.severity for r in rules if SEVERITIES.index(r.severity) >= rank}
    for r in kept:  # an alert of a rule outside the set still counts (none expected)
        for a in r.alerts:
            names.setdefault(a["rule"], a["severity"])
    per_rule = [rule_figures(n, sev, kept, healthy_steps) for n, sev in names.items()]
    overall = rule_figures(ANY, min_severity, kept, healthy_steps)
    return {
        "schema": 1,
        "min_severity": min_severity,
        "healthy_steps": healthy_steps,
        "runs": [r.as_dict() for r in kept],
        "rules": per_rule,
        "any": overall,
    }
