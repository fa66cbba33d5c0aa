"""``logitwatch zoo``: train the instability zoo through the real agent into a service, and score it.

Each case (stable controls, failing configurations, corrupted batches) runs for several seeds in
worker processes; the service's alerts are read back and set against when each run diverged.

Divergence: a non-finite loss; or a trailing-mean loss that stays above ln(vocab) to the end; or
one that stays at least 0.2 nats above the stable control of the same seed to the end (at this
scale runs without QK-norm stall rather than blow up, so the gap is what shows it).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from logitwatch.agent.zoo.cases import CASES, REDUCED, ZooScale, cases_named
from logitwatch.agent.zoo.report import describe
from logitwatch.agent.zoo.run import ZooResult, run_zoo

__all__ = ["add_arguments", "print_table", "run", "zoo_table"]


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


def print_table(result: ZooResult, console: Any = None) -> None:
    """The zoo table, on `console` (default: the terminal, or 200 columns into a pipe or file)."""
    from rich.console import Console

    # Wide enough for the table when the output is a pipe or a file (CI logs, tee).
    (console or Console(width=None if sys.stdout.isatty() else 200)).print(zoo_table(result))


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
