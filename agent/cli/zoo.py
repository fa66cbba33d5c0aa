"""``logitwatch zoo``: train the instability zoo through the real agent into a service, and score it.

Each case (stable controls, failing configurations, corrupted batches) runs for several seeds in
worker processes; the service's alerts are read back and set against when each run diverged.

Divergence: a non-finite loss; or a trailing-mean loss that stays above ln(vocab) to the end; or
one that stays at least 0.2 nats above the stable control of the same seed to the end (at this
scale runs without QK-norm mostly stall rather than blow up, so the gap is what shows it).

Every run also writes its metrics file (OUT/metrics/*.jsonl); `logitwatch backtest` replays
them through the service's rule engine for the lead-time table (targets: the first warning
>= 30 steps before divergence on every run, median >= 40, naming the cause) and the
false-alarm table (alerts per 1,000 healthy steps; target 0). --healthy runs the healthy
matrix: every control, the six presets, tiny Hugging Face GPT-2/Llama/Qwen2 under their
Trainer, and a user decoder under attach.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from logitwatch.agent.zoo.cases import (
    CASES,
    HEALTHY_SCALE,
    REDUCED,
    ZooScale,
    cases_named,
    healthy_cases,
)
from logitwatch.agent.zoo.report import (
    LEAD_MEDIAN,
    LEAD_MIN,
    describe,
    false_alarms,
    leads,
    run_alerts,
)
from logitwatch.agent.zoo.run import ZooResult, rescore, run_zoo

__all__ = [
    "add_arguments",
    "false_alarm_table",
    "lead_table",
    "print_table",
    "run",
    "zoo_table",
]


def zoo_table(result: ZooResult) -> Any:
    """One row per configuration and seed; first warning and first critical share a cell so the
    table fits 80 columns (narrower, it prints a block per run)."""
    from rich.text import Text

    from logitwatch.tables import Col, Records, num

    s = result.scale
    table = Records(
        [Col("case", readable=17), "diverged", Col("first alerts", readable=16),
         num("lead"), num("final loss"), Col("verdict", readable=14)],
        title=f"logitwatch zoo: {s.steps} steps, batch {s.batch_size}x{s.seq_len}, "
        f"{s.n_layers} layers x d{s.d_model}, {len(result.scores)} runs in {result.seconds:.0f} s"
        "; lead in steps",
    )  # fmt: skip
    marks = {True: ("pass", "green"), False: ("FAIL", "red"), None: ("n/a", "yellow")}
    for r in result.scores:
        div = f"@{r.diverged_at} ({r.reason})" if r.diverged_at is not None else "no"
        alerts = [f"{sev} {describe(a)}" for sev, a in
                  (("warning", r.first_warning), ("critical", r.first_critical)) if a]  # fmt: skip
        table.add_row(
            f"{r.case}\n{r.kind}, seed {r.seed}", div, "\n".join(alerts) or "-",
            "-" if r.lead_steps is None else str(r.lead_steps), f"{r.final_loss:.3f}",
            Text.assemble(marks[r.passed], f" {r.why}"),
        )  # fmt: skip
    return table


def _where(alert: dict[str, Any]) -> str:
    """'attn.logit_max L0/h3' : the series an alert fired on."""
    labels = alert.get("labels") or {}
    order = sorted(labels, key=lambda k: (k != "layer", k != "head", k))
    short = {"layer": "L", "head": "h"}
    where = "/".join(f"{short.get(k, k + '=')}{labels[k]}" for k in order)
    return f"{alert.get('metric') or '?'}{' ' + where if where else ''}"


def _value(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, int | float) else str(x)


def _runs(result: ZooResult):
    cases = {c.name: c for c in (*CASES, *healthy_cases())}
    return run_alerts(result.scores, cases, result.backtest)


def false_alarm_table(result: ZooResult) -> Any:
    """Per rule: warning-or-worse alerts on the controls per 1,000 healthy steps (target 0), as
    the backtest's replay saw them and as the live service raised them (it also runs the
    wall-clock rules, run-silent); then every such alert: run, rule, series, step, value."""
    from logitwatch.tables import Col, Records, num

    cases = {c.name: c for c in (*CASES, *healthy_cases())}
    live, _ = run_alerts(result.scores, cases, None)
    runs, source = run_alerts(result.scores, cases, result.backtest)
    steps, per_rule = false_alarms(runs, result.scale.steps)
    _, per_rule_live = false_alarms(live, result.scale.steps)
    controls = [r for r in runs if r.kind == "control"]
    table = Records(
        [Col("rule", readable=20), num("replayed"), num("live"), num("per 1,000 steps")],
        title=f"false alarms: {len(controls)} healthy runs, {steps:,} steps",
        caption=f"warning-or-worse alerts, replayed ({source}) and live (service); "
        "per 1,000 steps of the larger; the target is 0",
    )
    rules = sorted(set(per_rule) | set(per_rule_live))
    total = (sum(per_rule.values()), sum(per_rule_live.values()))
    for rule in [*rules, "all rules"]:
        n, m = (per_rule.get(rule, 0), per_rule_live.get(rule, 0)) if rule in rules else total
        table.add_row(rule, str(n), str(m), f"{1000 * max(n, m) / max(steps, 1):.2f}")
    detail = Records(
        [Col("run", readable=18), Col("rule", readable=14), Col("series", readable=14),
         num("fired"), num("value"), num("threshold")],
        title="each false alarm (replayed, then live)",
    )  # fmt: skip
    also = [r for r in live if r.kind == "control"] if source == "backtest" else []
    for r in [*controls, *also]:
        for a in r.alerts:
            detail.add_row(f"{r.case} s{r.seed}", f"{a['rule']} ({a['severity']})", _where(a),
                           _value(a["fired_step"]), _value(a.get("value")),
                           _value(a.get("threshold")))  # fmt: skip
    return table if not rules else (table, detail)


def lead_table(result: ZooResult) -> Any:
    """Per failing run: divergence, the first warning-or-worse alert, the lead, and whether it
    names the cause; targets: lead >= 30 on every run, median >= 40, the cause named first."""
    import statistics

    from logitwatch.tables import Col, Records, num

    runs, source = _runs(result)
    failing = [r for r in runs if r.kind == "failing"]
    table = Records(
        [Col("case", readable=16), "diverged", Col("first alert", readable=18), num("lead"),
         "cause first"],
        title="lead times of the first warning-or-worse alert, in steps",
        caption=f"alerts from the {source}; targets: >= {LEAD_MIN} steps on every run, "
        f"median >= {LEAD_MEDIAN}, the cause named first",
    )  # fmt: skip
    got = []
    for r in failing:
        first, lead, named = leads(r)
        if lead is not None:
            got.append(lead)
        alert = "-" if first is None else f"{first['rule']} {_where(first)} @{first['fired_step']}"
        table.add_row(
            f"{r.case}\nseed {r.seed}", "no" if r.diverged_at is None else f"@{r.diverged_at}",
            alert, "-" if lead is None else str(lead), {True: "yes", False: "NO", None: "-"}[named],
        )  # fmt: skip
    diverged = [r for r in failing if r.diverged_at is not None]
    if got:
        table.add_row(
            "all diverged", f"{len(diverged)}/{len(failing)}", f"{len(got)} warned",
            f"min {min(got)}\nmedian {statistics.median(got):.0f}", "",
        )  # fmt: skip
    return table


def print_table(result: ZooResult, console: Any = None) -> None:
    """The zoo's tables, on `console` (default: the terminal, or 200 columns into a pipe)."""
    from rich.console import Console

    # Wide enough for the table when the output is a pipe or a file (CI logs, tee).
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    console.print(zoo_table(result))
    if any(s.kind == "failing" for s in result.scores):
        console.print(lead_table(result))
    if any(s.kind == "control" for s in result.scores):
        tables = false_alarm_table(result)
        for t in tables if isinstance(tables, tuple) else (tables,):
            console.print(t)
    if result.backtest_error:
        console.print(f"backtest: {result.backtest_error}", markup=False, highlight=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument("--reduced", action="store_true", help="the small, quick zoo (tests)")
    parser.add_argument(
        "--healthy",
        action="store_true",
        help="the healthy matrix: every control, the six presets, tiny Hugging Face GPT-2, "
        "Llama and Qwen2, a user decoder under attach; prints the false-alarm table",
    )
    parser.add_argument(
        "--cases",
        metavar="A,B",
        help=f"cases to run (default all: {', '.join(c.name for c in CASES)})",
    )
    parser.add_argument(
        "--seeds", type=int, metavar="N", help="seeds per case (default 3; reduced 1)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="steps per run (default 240; reduced and healthy 150)",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, metavar="N", help="runs at a time (default 2)"
    )
    parser.add_argument("--server", metavar="URL", help="a running service (default: start one)")
    parser.add_argument(
        "--out", metavar="DIR", default=".logitwatch/zoo", help="zoo.json and a PNG per run"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="train nothing: replay the metrics of the zoo in --out through the rules as they "
        "are now (logitwatch backtest) and print the tables again",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a run misses its target")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.rescore:
        result = rescore(args.out)
        print_table(result)
        return 1 if args.strict and not result.passed else 0
    scale = REDUCED if args.reduced else HEALTHY_SCALE if args.healthy else ZooScale()
    over = {k: getattr(args, k) for k in ("seeds", "steps") if getattr(args, k) is not None}
    scale = replace(scale, **over)
    if args.healthy and args.cases:
        raise ValueError("--healthy runs the healthy matrix: give --cases or --healthy, not both.")
    cases = (
        healthy_cases()
        if args.healthy
        else cases_named(args.cases.split(",") if args.cases else None)
    )
    result = run_zoo(
        cases, scale, server=args.server, jobs=args.jobs, out=args.out, plots=not args.no_plots
    )
    print_table(result)
    print(f"logitwatch zoo: results and plots in {args.out}")
    return 1 if args.strict and not result.passed else 0
