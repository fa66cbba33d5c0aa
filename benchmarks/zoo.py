"""The full instability zoo: every case x seeds, scored, with a table, zoo.json and a PNG per run.

    python benchmarks/zoo.py [--seeds N] [--steps N] [--jobs 2] [--out .logitwatch/zoo-benchmark]

Starts its own `logitwatch serve` (SQLite in a temp dir) unless --server URL is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from logitwatch.agent.cli.zoo import print_table
from logitwatch.agent.zoo.cases import ZooScale, cases_named
from logitwatch.agent.zoo.run import run_zoo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=ZooScale.seeds)
    p.add_argument("--steps", type=int, default=ZooScale.steps)
    p.add_argument("--cases", help="comma list (default: all)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--server")
    p.add_argument("--out", default=".logitwatch/zoo-benchmark")
    args = p.parse_args(argv)
    scale = ZooScale(steps=args.steps, seeds=args.seeds)
    cases = cases_named(args.cases.split(",") if args.cases else None)
    result = run_zoo(cases, scale, server=args.server, jobs=args.jobs, out=args.out)
    print_table(result)
    summary(result)
    print(f"results and plots in {args.out}")
    return 0


def summary(result) -> None:
    """Per kind: runs passing their target; for failing runs the lead time of the first warning."""
    for kind in ("control", "failing", "spike"):
        rows = [s for s in result.scores if s.kind == kind]
        if not rows:
            continue
        ok = sum(s.passed is True for s in rows)
        na = sum(s.passed is None for s in rows)
        line = f"{kind:8s} {ok}/{len(rows)} pass" + (
            f" ({na} n/a: no divergence, silent)" if na else ""
        )
        if kind == "failing":
            div = [s for s in rows if s.diverged_at is not None]
            leads = [s.lead_steps for s in div if s.lead_steps is not None and s.lead_steps > 0]
            line += f"; diverged {len(div)}/{len(rows)}; warned before divergence {len(leads)}/{len(div)}"
            if leads:
                line += f"; lead median {statistics.median(leads):.0f} steps (min {min(leads)})"
        print(line)
    print(f"wall time {result.seconds:.0f} s for {len(result.scores)} runs")


if __name__ == "__main__":
    sys.exit(main())
