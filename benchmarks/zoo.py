"""The full instability zoo: every case x seeds, scored, with a table, zoo.json and a PNG per run.

    python benchmarks/zoo.py [--seeds N] [--steps N] [--jobs 2] [--out .logitwatch/zoo-benchmark]
    python benchmarks/zoo.py --healthy [--seeds 3]   # the healthy matrix: false alarms only

Starts its own `logitwatch serve` (SQLite in a temp dir) unless --server URL is given. Every
run also writes its metrics file (out/metrics/*.jsonl); the lead-time and false-alarm tables
come from `logitwatch backtest` replaying them, so `logitwatch backtest out/metrics --healthy
'*stable*' ...` re-scores a zoo against a candidate rule set without training again.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from rich.console import Console

from logitwatch.agent.cli.zoo import print_table
from logitwatch.agent.zoo.cases import HEALTHY_SCALE, ZooScale, cases_named, healthy_cases
from logitwatch.agent.zoo.run import run_zoo
from logitwatch.tables import Records, num


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=ZooScale.seeds)
    p.add_argument(
        "--steps", type=int, help=f"default {ZooScale.steps}; healthy {HEALTHY_SCALE.steps}"
    )
    p.add_argument("--cases", help="comma list (default: all)")
    p.add_argument("--healthy", action="store_true", help="the healthy matrix instead")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--server")
    p.add_argument("--out", default=".logitwatch/zoo-benchmark")
    args = p.parse_args(argv)
    base = HEALTHY_SCALE if args.healthy else ZooScale()
    scale = ZooScale(steps=args.steps or base.steps, seeds=args.seeds)
    if args.healthy:
        cases = healthy_cases()
    else:
        cases = cases_named(args.cases.split(",") if args.cases else None)
    result = run_zoo(cases, scale, server=args.server, jobs=args.jobs, out=args.out)
    print_table(result)
    summary(result)
    print(f"results and plots in {args.out}")
    return 0


def summary_table(result) -> Records:
    """Per kind: runs passing their target; for failing runs the lead time of the first warning."""
    table = Records(
        ["kind", num("pass"), num("n/a"), num("diverged"), num("warned first"),
         num("lead median"), num("lead min")],
        title="zoo by kind (n/a: no divergence and silent; warned first: before divergence; "
        "lead in steps)",
    )  # fmt: skip
    for kind in ("control", "failing", "spike"):
        rows = [s for s in result.scores if s.kind == kind]
        if not rows:
            continue
        ok = sum(s.passed is True for s in rows)
        na = sum(s.passed is None for s in rows)
        cells = ["-"] * 4
        if kind == "failing":
            div = [s for s in rows if s.diverged_at is not None]
            leads = [s.lead_steps for s in div if s.lead_steps is not None and s.lead_steps > 0]
            cells = [f"{len(div)}/{len(rows)}", f"{len(leads)}/{len(div)}", "-", "-"]
            if leads:
                cells[2:] = [f"{statistics.median(leads):.0f}", str(min(leads))]
        table.add_row(kind, f"{ok}/{len(rows)}", str(na), *cells)
    return table


def summary(result) -> None:
    Console().print(summary_table(result))
    print(f"wall time {result.seconds:.0f} s for {len(result.scores)} runs")


if __name__ == "__main__":
    sys.exit(main())
