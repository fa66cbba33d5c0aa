"""``logitwatch runs|series|query|alerts``: read a running service over HTTP, as tables or JSON.

The server is ``--server`` (or LOGITWATCH_SERVER, default http://127.0.0.1:8000); the token,
when the server wants one, is ``--token`` (or LOGITWATCH_TOKEN).
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

from logitwatch.client import ApiClient, ServiceError
from logitwatch.tables import Col, Records, num

__all__ = ["add_arguments", "run"]

DEFAULT_SERVER = "http://127.0.0.1:8000"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "—"


def _num(v: Any) -> str:
    # JSON spells non-finite values as strings ('NaN', ...): they pass through as written.
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _time(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return ""
    return datetime.fromtimestamp(t, UTC).isoformat(sep=" ", timespec="milliseconds")[:23]


def _step(step: Any) -> str:
    return "—" if step is None else str(step)


def _fired_step(alert: dict[str, Any]) -> int | None:
    """The step the alert went firing at (None while pending); alerts stored before the
    service recorded it fall back to the step they began."""
    if alert.get("fired_step") is not None:
        return alert["fired_step"]
    return None if alert.get("state") == "pending" else alert.get("first_step")


def _label_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--label wants KEY=VALUE, not {text!r}")
    return key, value


def add_arguments(parser: argparse.ArgumentParser, command: str = "runs") -> None:
    parser.add_argument("--server", default=None, metavar="URL",
                        help=f"service URL (default: LOGITWATCH_SERVER or {DEFAULT_SERVER})")  # fmt: skip
    parser.add_argument("--token", default=None, help="API token (default: LOGITWATCH_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    if command == "series":
        parser.add_argument("run")
        parser.add_argument("--metric", help="only this metric")
    elif command == "query":
        parser.add_argument("run")
        parser.add_argument("metric", help="for example loss or attn.logit_max")
        parser.add_argument("--layer", help="only this layer")
        parser.add_argument("--head", help="only this head")
        parser.add_argument("--label", type=_label_arg, action="append", default=[],
                            metavar="KEY=VALUE", help="any other label filter (repeatable)")  # fmt: skip
        parser.add_argument("--start", type=int, help="first step (inclusive)")
        parser.add_argument("--end", type=int, help="last step (inclusive)")
        parser.add_argument("--max-points", type=int,
                            help="cut the range into at most N buckets (first step, min, max, last)")  # fmt: skip
        parser.add_argument("--segments", choices=("newest", "all"), default="newest",
                            help="'all' also returns steps overwritten by a resumed run")  # fmt: skip
    elif command == "alerts":
        parser.add_argument("--run", help="only this run")
        parser.add_argument("--state", choices=("pending", "firing", "resolved"))


def _runs(api: ApiClient, args: argparse.Namespace, console: Console) -> Any:
    doc = {"runs": api.runs()}
    if args.json:
        return doc
    table = Records([Col("run", readable=32), num("series"), num("segment"), num("last step"),
                     Col("last seen", readable=10), Col("tags", readable=16)],
                    title="runs (times in UTC)")  # fmt: skip
    for r in doc["runs"]:
        seen = (r.get("last_seen_at") or "")[:19].replace("T", " ")
        # A tag a line: JSON's quotes and braces cost width and wrap badly in a narrow column.
        tags = "\n".join(f"{k}={v}" for k, v in sorted((r.get("tags") or {}).items()))
        table.add_row(r["name"], str(r["n_series"]), str(r["max_segment"]),
                      str(r["last_step"] if r["last_step"] is not None else "—"), seen,
                      tags)  # fmt: skip
    console.print(table)
    return None


def _series(api: ApiClient, args: argparse.Namespace, console: Console) -> Any:
    doc = {"run": args.run, "series": api.series(args.run, metric=args.metric)}
    if args.json:
        return doc
    table = Records([Col("metric", readable=20), "labels", num("points"), num("first step"), num("last step"),
                     num("last value")], title=f"run {args.run}")  # fmt: skip
    for s in doc["series"]:
        table.add_row(s["metric"], _labels(s["labels"]), f"{s['n_points']:,}",
                      str(s["first_step"]), str(s["last_step"]), _num(s["last_value"]))  # fmt: skip
    console.print(table)
    return None


def _query(api: ApiClient, args: argparse.Namespace, console: Console) -> Any:
    labels = {"layer": args.layer, "head": args.head, **dict(args.label)}
    doc = api.metric(
        args.run, args.metric, labels=labels, start=args.start, end=args.end,
        max_points=args.max_points, segments=args.segments,
    )  # fmt: skip
    if args.json:
        return doc
    bucketed = args.max_points is not None
    cols = (["first step", "last step", "count", "min", "max", "last", "NaN"] if bucketed
            else ["step", "value"])  # fmt: skip
    for s in doc["series"]:
        title = f"{args.run} {args.metric} {_labels(s['labels']) if s['labels'] else ''}".strip()
        if s.get("segment") is not None:
            title += f" segment {s['segment']}"
        table = Records(
            [*map(num, cols), *([] if bucketed else [Col("time (UTC)", readable=23)])], title=title
        )
        if bucketed:
            names = ("steps", "last_steps", "count", "min", "max", "last", "nan")
        else:
            names = ("steps", "values", "times")
        shown = {c: [(_time if c == "times" else _num)(v) for v in s.get(c) or []] for c in names}
        for i in range(len(s["steps"])):
            table.add_row(*(shown[c][i] if shown[c] else "" for c in names))
        console.print(table)
    if not doc["series"]:
        console.print(f"no series of {args.metric} in run {args.run} match")
    return None


def _alerts(api: ApiClient, args: argparse.Namespace, console: Console) -> Any:
    doc = {"alerts": api.alerts(run=args.run, state=args.state)}
    if args.json:
        return doc
    table = Records(
        [num("id"), Col("run", readable=32), Col("rule", readable=20), "severity", "state",
         Col("metric", readable=20), "labels", num("fired"), num("last"),
         num("value"), Col("hint", readable=24)],
        title="alerts (fired: the step it went firing; last: the last step its condition held)",
    )  # fmt: skip
    for a in doc["alerts"]:
        table.add_row(str(a["id"]), a["run"], a["rule"], a["severity"], a["state"], a["metric"],
                      _labels(a.get("labels") or {}), _step(_fired_step(a)),
                      _step(a.get("last_step")), _num(a.get("value")),
                      a.get("hint") or "")  # fmt: skip
    console.print(table)
    return None


_COMMANDS = {"runs": _runs, "series": _series, "query": _query, "alerts": _alerts}


def run(args: argparse.Namespace) -> int:
    server = (args.server or os.environ.get("LOGITWATCH_SERVER") or DEFAULT_SERVER).rstrip("/")
    token = args.token or os.environ.get("LOGITWATCH_TOKEN")
    console = Console()
    try:
        with ApiClient(server, token, timeout=60) as api:
            doc = _COMMANDS[args._command](api, args, console)
    except ServiceError as exc:
        console.print(f"logitwatch: error: {exc}", style="red", highlight=False, markup=False)
        return 1
    if doc is not None:
        print(json.dumps(doc, indent=2))
    return 0
