"""``logitwatch backtest``: replay stored runs through a rule set and score each rule."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from logitwatch.tables import Col, Records, num

__all__ = ["add_arguments", "run"]

EPILOG = """\
Inputs: metrics files (the agent's JSON lines from a FileSink, or `logitwatch train
--metrics-out` lines; a folder means its *.jsonl), one file a run; or, with --server, run
names or globs ('zoo-*') whose every point is read over the REST API.

Rules: the built-ins; --rules FILE replaces built-ins of the same name and adds the others,
as `serve --rules` does (--no-builtins: only the file's). The service's rule engine runs on
a throwaway SQLite database, deleted afterwards. Absent rules (run-silent) watch the wall
clock, not the steps: they never fire in a replay.

Labels: --diverged RUN=STEP and --healthy RUN|GLOB; a run marked neither is diverged at its
first non-finite loss, else unlabelled (its alerts count in "runs fired" and flaps only).
Figures (alerts of --min-severity and above): lead = divergence step - the rule's first
fired_step (negative: fired after); false alarms = alerts on healthy runs, also per 1,000
steps of their step spans; flaps = alerts of a (run, rule, series) after its first.

--json prints {"schema": 1, "min_severity", "healthy_steps",
  "runs": [{"run", "origin", "status": "diverged"|"healthy"|"unlabelled", "diverged_at",
            "reason", "first_step", "last_step", "steps",
            "alerts": [{"rule", "severity", "metric", "labels", "fired_step",
                        "resolved_step", "first_step", "last_step", "value", "threshold"}]}],
  "rules": [{"rule", "severity", "runs_fired", "fired_step": {run: step|null},
             "lead_steps": {run: steps}, "lead_median", "lead_min", "false_alarms",
             "false_alarms_per_1k", "flaps"}],
  "any": the same figures for the earliest alert of any rule}
("rules": each rule of --min-severity and above; only diverged runs in fired_step and
lead_steps; null where there is no figure).
"""


def _diverged(text: str) -> tuple[str, int]:
    name, sep, step = text.rpartition("=")
    if not sep or not name or not step.isdigit():
        raise argparse.ArgumentTypeError(f"--diverged wants RUN=STEP (a step >= 0), not {text!r}")
    return name, int(step)


def add_arguments(parser: argparse.ArgumentParser, command: str = "backtest") -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("inputs", nargs="+", metavar="FILE|RUN",
                        help="metrics files or folders; with --server, run names or globs")  # fmt: skip
    parser.add_argument("--server", metavar="URL",
                        help="read the runs from this service (LOGITWATCH_SERVER is not used)")  # fmt: skip
    parser.add_argument("--token", default=None, help="API token (default: LOGITWATCH_TOKEN)")
    parser.add_argument("--rules", metavar="FILE", help="candidate rules (YAML, as serve --rules)")
    parser.add_argument("--no-builtins", action="store_true",
                        help="replay only the --rules file's rules")  # fmt: skip
    parser.add_argument("--diverged", type=_diverged, action="append", default=[],
                        metavar="RUN=STEP", help="this run diverged at STEP (repeatable)")  # fmt: skip
    parser.add_argument("--healthy", action="append", default=[], metavar="RUN|GLOB",
                        help="this run is healthy: any alert on it is a false alarm")  # fmt: skip
    parser.add_argument("--min-severity", choices=("info", "warning", "critical"),
                        default="warning", help="count alerts of this severity and above")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _files(inputs: list[str]) -> list[Path]:
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise ValueError(f"{path}: no *.jsonl metrics files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder (give --server URL to read runs)")
    return files


def _load(args: argparse.Namespace, progress: Progress) -> list[Any]:
    from logitwatch.service.rules.backtest.sources import from_file, from_service, select_runs

    if args.server is None:
        return [from_file(p) for p in _files(args.inputs)]
    from logitwatch.client import ApiClient

    if not args.server.startswith(("http://", "https://")):
        raise ValueError(f"--server must be an http(s) URL, not {args.server!r}")
    token = args.token or os.environ.get("LOGITWATCH_TOKEN")
    with ApiClient(args.server, token, timeout=120) as api:
        names = select_runs([r["name"] for r in api.runs()], args.inputs)
        task = progress.add_task("reading", total=len(names))
        runs = []
        for name in names:
            progress.update(task, description=f"reading {name}")
            runs.append(from_service(api, name))
            progress.advance(task)
        progress.remove_task(task)
    return runs


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.0f}" if x.is_integer() or abs(x) >= 100 else f"{x:.3g}"
    return str(x)


def _tables(doc: dict[str, Any]) -> list[Records]:
    runs = Records([Col("run", readable=24), Col("status"), num("diverged at"), num("steps"),
                    num("alerts")], title="runs")  # fmt: skip
    for r in doc["runs"]:
        status = f"{r['status']} ({r['reason']})" if r["reason"] else r["status"]
        runs.add_row(r["run"], status, _fmt(r["diverged_at"]), str(r["steps"]),
                     str(len(r["alerts"])))  # fmt: skip
    diverged = [r["run"] for r in doc["runs"] if r["status"] == "diverged"]
    quiet = [f["rule"] for f in doc["rules"] if not f["runs_fired"]]
    caption = f"never fired: {', '.join(quiet)}" if quiet else None
    rules = Records([Col("rule", readable=26), num("runs fired"), Col("fired at, per diverged run"),
                     num("lead median"), num("lead min"), num("false alarms"), num("per 1k steps"),
                     num("flaps")],
                    title=f"rules ({doc['min_severity']} and above)", caption=caption)  # fmt: skip
    for f in [*[f for f in doc["rules"] if f["runs_fired"]], doc["any"]]:
        steps = " ".join(_fmt(f["fired_step"][n]) for n in diverged) or "—"
        rules.add_row(f["rule"], str(f["runs_fired"]), steps, _fmt(f["lead_median"]),
                      _fmt(f["lead_min"]), str(f["false_alarms"]), _fmt(f["false_alarms_per_1k"]),
                      str(f["flaps"]))  # fmt: skip
    return [runs, rules]


def run(args: argparse.Namespace) -> int:
    from logitwatch.client import ServiceError
    from logitwatch.service.rules.backtest import backtest
    from logitwatch.service.rules.model import load_rules_file

    rules = load_rules_file(args.rules) if args.rules else []
    if args.no_builtins and not rules:
        raise ValueError("--no-builtins leaves no rules: give --rules FILE")
    diverged = dict(args.diverged)
    err = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=True,
                        disable=args.quiet)  # fmt: skip
    with progress:
        try:
            runs = _load(args, progress)
        except ServiceError as exc:
            err.print(f"logitwatch: error: {exc}", style="red", highlight=False, markup=False)
            return 1
        overall = progress.add_task("replaying", total=len(runs))
        batches = progress.add_task("", total=None)

        names = [r.name for r in runs]

        def tick(stored, done: int, total: int) -> None:
            progress.update(batches, description=stored.name, completed=done, total=total)
            progress.update(overall, completed=names.index(stored.name) + (done == total))

        doc = backtest(runs, rules=rules, builtins=not args.no_builtins, diverged=diverged,
                       healthy=args.healthy, min_severity=args.min_severity,
                       progress=tick)  # fmt: skip
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    console = Console()
    for table in _tables(doc):
        console.print(table)
    return 0
