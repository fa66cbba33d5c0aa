"""``logitwatch plot``: a run's stability panels, read from the service and drawn to a picture.

matplotlib (the ``[plot]`` extra) is imported only when a figure is drawn, so the core stays light.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logitwatch.client import Alert, ApiClient, ServiceError
from logitwatch.metrics import spec
from logitwatch.protocol import ProtocolError, check_metric_name, check_run_name, load_float

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_METRICS",
    "SEVERITY_COLOURS",
    "Line",
    "Panel",
    "Picture",
    "PlotError",
    "add_arguments",
    "alert_step",
    "draw",
    "figure",
    "mark_alerts",
    "plot_runs",
    "read",
    "run",
    "save",
]

DEFAULT_METRICS = ("loss", "lr", "attn.logit_max", "logz.mean", "grad.norm")
DEFAULT_SERVER = "http://127.0.0.1:8000"
#: About one bucket per pixel column of the default width: more buys nothing on screen.
DEFAULT_MAX_POINTS = 1000
MAX_POINTS_LIMIT = 100_000  # the service's own bound on max_points
#: Metrics whose runaway is multiplicative (x10 in a few steps): a log axis keeps both the
#: healthy range and the blow-up readable. Used only when every value drawn is positive.
LOG_METRICS = frozenset({"attn.logit_max", "grad.norm", "update.ratio", "logits.max_abs"})
SEVERITY_COLOURS = {"critical": "tab:red", "warning": "tab:orange", "info": "tab:blue"}
#: Several runs overlaid: one line style per run, so colour can tell layers apart.
RUN_STYLES = ("-", "--", ":", "-.")
STYLE_NAMES = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}
FORMATS = (".png", ".svg", ".pdf")
WIDTH_IN, PANEL_IN, MARGIN_IN, DPI = 10.0, 1.9, 1.0, 100
INSTALL_HINT = "pip install 'logitwatch[plot]'"


class PlotError(Exception):
    """Drawing is not possible here (matplotlib missing): one readable line."""


@dataclass
class Line:
    """One series of a panel after heads are folded: a value per bucket, first step on x."""

    run: str
    labels: dict[str, str]
    steps: list[int] = field(default_factory=list)
    last: list[float] = field(default_factory=list)  # NaN where not finite: a gap
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    #: (first step, last step of the bucket, 'NaN' | '+Inf' | '-Inf')
    nonfinite: list[tuple[int, int, str]] = field(default_factory=list)
    bucketed: bool = False  # some bucket held several points: draw its min-max band


@dataclass
class Panel:
    metric: str
    lines: list[Line] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)  # why a run has nothing here


@dataclass
class Picture:
    """What ``read`` got from the service; ``draw`` makes a Figure of it."""

    runs: list[str]
    panels: list[Panel]
    alerts: dict[str, list[Alert]] = field(default_factory=dict)
    since: int | None = None
    until: int | None = None
    notes: list[str] = field(default_factory=list)  # metrics a run lacks, for the user


def alert_step(alert: Alert | dict[str, Any]) -> int | None:
    """The step an alert fired at: ``fired_step`` where the service gives it, else first_step."""
    step = alert.get("fired_step")
    if step is None:
        step = alert.get("first_step")
    return None if step is None else int(step)


def _fired(alert: Alert | dict[str, Any]) -> bool:
    # A pending alert, or one resolved before it ever fired, has not fired: nothing to mark.
    if alert.get("state") == "pending":
        return False
    return not ("fired_at" in alert and alert["fired_at"] is None)


def _in_range(step: int | None, since: int | None, until: int | None) -> bool:
    return (
        step is not None and (since is None or step >= since) and (until is None or step <= until)
    )


def read(
    client: ApiClient,
    runs: Sequence[str],
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    since: int | None = None,
    until: int | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
) -> Picture:
    """Each run's series, alerts and bucketed points of ``metrics`` between since and until.

    An unknown run raises ServiceError (404, the run named); a metric a run lacks is a note
    and an empty panel, not an error.
    """
    panels = [Panel(m) for m in dict.fromkeys(metrics)]
    pic = Picture(list(dict.fromkeys(runs)), panels, since=since, until=until)
    for run in pic.runs:
        series = client.series(run)
        have = sorted({s["metric"] for s in series})
        alerts = client.alerts(run=run, limit=10_000)
        pic.alerts[run] = [
            a for a in alerts if _fired(a) and _in_range(alert_step(a), since, until)
        ]
        for panel in pic.panels:
            rows = [s for s in series if s["metric"] == panel.metric]
            if not rows:
                panel.empty.append(f"run {run!r} has no {panel.metric!r}")
                pic.notes.append(
                    f"run {run!r} has no metric {panel.metric!r} (it has: {', '.join(have) or 'none'})"
                )
                continue
            # One step range for every series of the metric, so that their buckets line up
            # and heads fold bucket by bucket.
            lo = since if since is not None else min(_steps(rows, "first_step"), default=None)
            hi = until if until is not None else max(_steps(rows, "last_step"), default=None)
            lines: list[Line] = []
            if lo is None or hi is None or lo <= hi:
                doc = client.metric(
                    run, panel.metric, start=lo, end=hi, max_points=max_points, times=False
                )
                lines = _fold(run, panel.metric, doc["series"])
            if not lines:
                panel.empty.append(f"run {run!r} has no {panel.metric!r} points in steps {lo}-{hi}")
            panel.lines += lines
    return pic


def _steps(rows: Iterable[dict[str, Any]], key: str) -> list[int]:
    return [int(r[key]) for r in rows if r.get(key) is not None]


def _num(raw: Any) -> float:
    return math.nan if raw is None else load_float(raw, "value")


def _nanmax(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


def _fold(run: str, metric: str, series: list[dict[str, Any]]) -> list[Line]:
    """Bucketed series -> one Line per label set, per-head series folded to their max.

    One line per layer stays readable where layers x heads would not; the max over heads is
    what the stability rules and the Prometheus view (the catalogue's prom_drop) look at.
    """
    s = spec(metric)
    drop = set(s.prom_drop) if s else set()
    groups: dict[tuple[tuple[str, str], ...], dict[int, list[float]]] = {}
    for doc in series:
        key = tuple(sorted((k, v) for k, v in doc["labels"].items() if k not in drop))
        per = groups.setdefault(key, {})
        names = ("steps", "last_steps", "count", "min", "max", "last", "nan")
        for step, end, count, lo, hi, last, nans in zip(*(doc[c] for c in names), strict=True):
            # Folded bucket: max of each column over heads (exact for max and last, a lower
            # bound for min); NaN counts add up.
            new = [_num(lo), _num(hi), _num(last), float(count), float(end), float(nans)]
            old = per.get(int(step))
            if old is None:
                per[int(step)] = new
            else:
                old[:5] = [_nanmax(o, n) for o, n in zip(old[:5], new[:5], strict=True)]
                old[5] += new[5]
    lines = []
    for key in sorted(groups, key=lambda k: [(name, len(v), v) for name, v in k]):
        per = groups[key]
        if not per:
            continue
        line = Line(run, dict(key))
        for step in sorted(per):
            lo, hi, last, count, end, nans = per[step]
            line.steps.append(step)
            line.last.append(last if math.isfinite(last) else math.nan)
            line.low.append(lo if math.isfinite(lo) else math.nan)
            line.high.append(hi if math.isfinite(hi) else math.nan)
            line.bucketed |= count > 1
            for kind, seen in (
                ("NaN", nans > 0),
                ("+Inf", hi == math.inf),
                ("-Inf", lo == -math.inf),
            ):
                if seen:
                    line.nonfinite.append((step, int(end), kind))
        lines.append(line)
    return lines


def _matplotlib() -> tuple[Any, Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.transforms import blended_transform_factory
    except ImportError as exc:
        raise PlotError(
            f"drawing a run needs matplotlib ({exc.name or 'matplotlib'} is missing): {INSTALL_HINT}"
        ) from None
    return Figure, FigureCanvasAgg, blended_transform_factory


def mark_alerts(
    ax: Axes, alerts: Iterable[Alert | dict[str, Any]], *, linestyle: str = "-"
) -> None:
    """A vertical line at each alert's firing step, coloured by severity (one per step and
    severity: twenty heads firing together are one line)."""
    seen = set()
    for a in alerts:
        step, severity = alert_step(a), str(a.get("severity"))
        if step is None or (step, severity) in seen:
            continue
        seen.add((step, severity))
        ax.axvline(step, color=SEVERITY_COLOURS.get(severity, "0.5"), lw=0.9, alpha=0.6,
                   ls=linestyle, zorder=1, gid=f"alert:{severity}")  # fmt: skip


def _name_alerts(ax: Axes, metric: str, pic: Picture, top: Any, *, undrawn: set[str]) -> None:
    # Each rule named once on its own metric's panel, at its first firing (from the bottom:
    # NaN marks sit at the top); alerts on the ``undrawn`` metrics (no panel of their own) are
    # named here with their metric. A name that would cover the one before it is left out.
    first: dict[str, tuple[int, str]] = {}
    for alerts in pic.alerts.values():
        for a in alerts:
            on, step = str(a.get("metric")), alert_step(a)
            if step is None or (on != metric and on not in undrawn):
                continue
            name = str(a.get("rule")) if on == metric else f"{a.get('rule')} ({on})"
            if step < first.get(name, (math.inf, ""))[0]:
                first[name] = (step, str(a.get("severity")))
    lo, hi = ax.get_xlim()
    gap = 0.025 * (hi - lo)  # about one rotated line of 6.5-point text on the default width
    last = -math.inf
    for name, (step, severity) in sorted(first.items(), key=lambda kv: kv[1][0]):
        if step - last < gap:
            continue
        last = step
        ax.text(step, 0.03, name, transform=top, rotation=90, ha="right", va="bottom", fontsize=6.5,
                color=SEVERITY_COLOURS.get(severity, "0.4"), gid="alert-rule", clip_on=True)  # fmt: skip


def _label(line: Line, panel: Panel, several_runs: bool) -> str:
    where = ", ".join(f"{k} {v}" for k, v in line.labels.items())
    if several_runs:
        return f"{line.run}: {where}" if where else line.run
    if where:
        return where
    # The unlabelled series beside per-layer ones is the global one (grad.norm, param.norm).
    return "global" if any(other.labels for other in panel.lines) else panel.metric


def _panel(ax: Axes, panel: Panel, styles: dict[str, str], top: Any) -> None:
    s = spec(panel.metric)
    title = panel.metric + (f": {s.help}" if s else "")
    if s and s.prom_drop:
        title += f" (max over {', '.join(d + 's' for d in s.prom_drop)})"
    ax.set_title(title, fontsize=9, loc="left")
    if s and s.unit != "1":
        ax.set_ylabel(s.unit, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.25, lw=0.5)
    several_runs = len(styles) > 1
    drawn = []
    for line in panel.lines:
        (artist,) = ax.plot(
            line.steps, line.last, lw=1.1, ls=styles[line.run], label=_label(line, panel, several_runs),
            marker="." if len(line.steps) < 30 else None, gid="series", zorder=3,
        )  # fmt: skip
        drawn += [v for v in (*line.last, *line.low, *line.high) if not math.isnan(v)]
        colour = artist.get_color()
        if line.bucketed:
            ax.fill_between(line.steps, line.low, line.high, color=colour, alpha=0.2, lw=0)
        if line.nonfinite:
            # At the top edge of the panel (x in steps, y in axes units): a NaN has no height,
            # and it must not vanish from the picture the way it vanishes from a line.
            first = not any(a.get_gid() == "nonfinite" for a in ax.lines)
            xs = [step for step, _, _ in line.nonfinite]
            ax.plot(xs, [0.92] * len(xs), transform=top, ls="none", marker="X", ms=8,
                    color=colour, mec="black", mew=0.6, clip_on=False, gid="nonfinite",
                    label="NaN / Inf" if first else "_nolegend_", zorder=4)  # fmt: skip
            for kind in dict.fromkeys(k for _, _, k in line.nonfinite):  # the first of each
                step, end, _ = next(n for n in line.nonfinite if n[2] == kind)
                where = f"{step}" if end == step else f"{step}-{end}"  # a bucket: somewhere in it
                ax.annotate(f"{kind} @ {where}", (step, 0.92), xycoords=top, xytext=(6, -3),
                            textcoords="offset points", fontsize=7)  # fmt: skip
    if panel.metric in LOG_METRICS and drawn and min(drawn) > 0:
        ax.set_yscale("log")
    if not panel.lines:
        ax.text(0.5, 0.5, "no data: " + "; ".join(panel.empty), transform=ax.transAxes,
                ha="center", va="center", color="0.35", fontsize=9, gid="empty")  # fmt: skip
        ax.set_yticks([])
    elif panel.empty:
        ax.text(0.995, 0.03, "; ".join(panel.empty), transform=ax.transAxes, ha="right",
                va="bottom", color="0.35", fontsize=7, gid="empty")  # fmt: skip
    labelled = [a for a in ax.lines if not a.get_label().startswith("_")]
    if len(labelled) > 1 or any(a.get_gid() == "nonfinite" for a in labelled):
        ax.legend(fontsize=7, loc="best", ncol=1 + (len(labelled) - 1) // 6, framealpha=0.8)


def draw(pic: Picture) -> Figure:
    """A Figure (Agg canvas, no pyplot state): one panel per metric, the runs overlaid."""
    figure_cls, canvas_cls, blended = _matplotlib()
    n = len(pic.panels)
    fig = figure_cls(figsize=(WIDTH_IN, PANEL_IN * n + MARGIN_IN), dpi=DPI, layout="constrained")
    canvas_cls(fig)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    styles = {r: RUN_STYLES[i % len(RUN_STYLES)] for i, r in enumerate(pic.runs)}
    for ax, panel in zip(axes, pic.panels, strict=True):
        _panel(ax, panel, styles, blended(ax.transData, ax.transAxes))
        for r in pic.runs:
            mark_alerts(ax, pic.alerts.get(r, []), linestyle=styles[r])
    if pic.since is not None or pic.until is not None:
        axes[-1].set_xlim(left=pic.since, right=pic.until)
    drawn = {p.metric for p in pic.panels}
    undrawn = {str(a.get("metric")) for alerts in pic.alerts.values() for a in alerts} - drawn
    for i, (ax, panel) in enumerate(zip(axes, pic.panels, strict=True)):  # x range known now
        top = blended(ax.transData, ax.transAxes)
        _name_alerts(ax, panel.metric, pic, top, undrawn=undrawn if i == 0 else set())
    axes[-1].set_xlabel(
        "training step   (vertical lines: alerts where they fired, red critical, orange warning,"
        " blue info; X: NaN/Inf)",
        fontsize=8,
    )
    names = " vs ".join(
        [f"{r} ({STYLE_NAMES[styles[r]]})" for r in pic.runs] if len(pic.runs) > 1 else pic.runs
    )
    span = ""
    if pic.since is not None or pic.until is not None:
        span = f", steps {'' if pic.since is None else pic.since}-{'' if pic.until is None else pic.until}"
    fig.suptitle(f"logitwatch: {names}{span}", fontsize=11)
    return fig


def figure(client: ApiClient, runs: Sequence[str], **kwargs: Any) -> Figure:
    """``draw(read(client, runs, **kwargs))``: the Figure, to inspect or save."""
    _matplotlib()  # before any request: a missing matplotlib is the first thing to say
    return draw(read(client, runs, **kwargs))


def save(fig: Figure, out: str | os.PathLike[str]) -> Path:
    """Write the figure (format from the suffix) and return its path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_runs(
    client: ApiClient,
    runs: Sequence[str],
    *,
    out: str | os.PathLike[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    since: int | None = None,
    until: int | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
) -> Path:
    """Draw ``runs`` (overlaid per panel) from the service to ``out``; its path.

    >>> with ApiClient("http://127.0.0.1:8000") as api:  # doctest: +SKIP
    ...     plot_runs(api, ["my-run"], metrics=["loss", "attn.logit_max"], out="run.png")
    """
    fig = figure(client, runs, metrics=metrics, since=since, until=until, max_points=max_points)
    return save(fig, out)


# --- the command -------------------------------------------------------------------------


def _run_arg(text: str) -> str:
    try:
        return check_run_name(text, "RUN")
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.message}") from None


def _metrics_arg(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--metrics wants metric names, e.g. loss,attn.logit_max")
    for name in names:
        try:
            check_metric_name(name, "--metrics")
        except ProtocolError as exc:
            raise argparse.ArgumentTypeError(f"--metrics {name!r}: {exc.message}") from None
    return names


def _step_arg(flag: str):
    def parse(text: str) -> int:
        try:
            step = int(text)
        except ValueError:
            step = -1
        if step < 0:
            raise argparse.ArgumentTypeError(
                f"{flag} wants a training step (an integer >= 0), not {text!r}"
            )
        return step

    return parse


def _max_points_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_POINTS_LIMIT:
        raise argparse.ArgumentTypeError(
            f"--max-points wants an integer from 1 to {MAX_POINTS_LIMIT:,}, not {text!r}"
        )
    return n


def _out_arg(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in FORMATS:
        raise argparse.ArgumentTypeError(
            f"-o/--out wants a file ending in {', '.join(FORMATS)}, not {text!r}"
        )
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"-o/--out {text!r} is a folder; give a file name")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", type=_run_arg,
                        help="the run(s) to draw; several are overlaid in each panel")  # fmt: skip
    parser.add_argument("--metrics", type=_metrics_arg, action="append", metavar="M[,M...]",
                        help=f"the panels, by metric name (repeatable; default: {','.join(DEFAULT_METRICS)})")  # fmt: skip
    parser.add_argument("--since", type=_step_arg("--since"), metavar="STEP",
                        help="first step drawn (default: the run's first)")  # fmt: skip
    parser.add_argument("--until", type=_step_arg("--until"), metavar="STEP",
                        help="last step drawn (default: the run's last)")  # fmt: skip
    parser.add_argument("--max-points", type=_max_points_arg, default=DEFAULT_MAX_POINTS, metavar="N",
                        help=f"buckets per series (default {DEFAULT_MAX_POINTS}); each keeps its min, max and NaN count")  # fmt: skip
    parser.add_argument("-o", "--out", type=_out_arg, metavar="FILE",
                        help="the picture, .png, .svg or .pdf (default: RUN.png in this folder)")  # fmt: skip
    parser.add_argument("--server", default=None, metavar="URL",
                        help=f"service URL (default: LOGITWATCH_SERVER or {DEFAULT_SERVER})")  # fmt: skip
    parser.add_argument("--token", default=None, help="API token (default: LOGITWATCH_TOKEN)")


def run(args: argparse.Namespace) -> int:
    from logitwatch.cli import UsageError

    if args.since is not None and args.until is not None and args.since > args.until:
        raise UsageError(f"--since {args.since} is after --until {args.until}")
    runs = list(dict.fromkeys(args.runs))
    metrics = [m for group in (args.metrics or [DEFAULT_METRICS]) for m in group]
    out = args.out or Path("_vs_".join(runs) + ".png")
    server = (args.server or os.environ.get("LOGITWATCH_SERVER") or DEFAULT_SERVER).rstrip("/")
    token = args.token or os.environ.get("LOGITWATCH_TOKEN")
    try:
        _matplotlib()
        with ApiClient(server, token, timeout=60) as api:
            pic = read(api, runs, metrics=metrics, since=args.since, until=args.until,
                       max_points=args.max_points)  # fmt: skip
        for note in pic.notes:
            print(f"logitwatch plot: {note}", file=sys.stderr)
        path = save(draw(pic), out)
    except (ServiceError, PlotError) as exc:
        print(f"logitwatch: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"logitwatch: error: -o/--out {str(out)!r}: cannot write it ({exc})", file=sys.stderr)
        return 1
    n_alerts = sum(len(a) for a in pic.alerts.values())
    print(f"wrote {path} ({len(pic.panels)} panels, {len(runs)} run(s), {n_alerts} alerts marked)")
    return 0
