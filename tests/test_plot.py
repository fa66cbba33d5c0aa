"""``logitwatch plot`` draws a real run read from a real service: panels, layers, alerts, NaN."""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers.server import thread_server

from logitwatch.client import ApiClient, points_path, run_path
from logitwatch.plot import (
    DEFAULT_METRICS,
    DPI,
    MARGIN_IN,
    PANEL_IN,
    WIDTH_IN,
    alert_step,
    figure,
    plot_runs,
)
from logitwatch.protocol import Batch, encode_batch, series_from_columns
from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings
from logitwatch.service.store.db import upgrade

pytest.importorskip("matplotlib")

RUN, CALM = "plot-hot", "plot-calm"
STEPS = 200
NAN_STEP = 150  # the loss goes NaN here: the built-in `nonfinite` rule fires (critical)
BIG = "plot-big"  # 50,000 steps: drawn from 1,000 buckets, its one NaN still marked
BIG_STEPS, BIG_NAN, BIG_INF = 50_000, 31_337, 44_444


def _series(hot: bool) -> list:
    steps = range(STEPS)
    loss = [5.0 - 3.0 * i / STEPS for i in steps]
    if hot:
        loss[NAN_STEP] = math.nan
    lr = [
        3e-3 * min(1.0, (i + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * i / STEPS)) for i in steps
    ]
    out = [
        series_from_columns("loss", {}, steps, loss),
        series_from_columns("lr", {"group": "0"}, steps, lr),
        series_from_columns("logz.mean", {}, steps, [6.0 - i / 100 for i in steps]),
        series_from_columns("grad.norm", {}, steps, [1.0 + (i == 120) * 9 for i in steps]),
    ]
    for layer in (0, 1):
        out.append(series_from_columns("grad.norm", {"layer": str(layer)}, steps, [0.5] * STEPS))
        for head in (0, 1):
            # layer 0 head 1 of the hot run runs away after step 100 (attn-logit-high fires)
            grow = hot and layer == 0 and head == 1
            vals = [10.0 * 1.03 ** max(0, i - 100) if grow else 5.0 + head for i in steps]
            labels = {"layer": str(layer), "head": str(head)}
            out.append(series_from_columns("attn.logit_max", labels, steps, vals))
    return out


def _post(c: httpx.Client, run: str, series: list, seq: int) -> None:
    c.post(
        points_path(run),
        content=encode_batch(Batch("plot-test", seq, 0, series)),
        headers={"content-type": "application/msgpack"},
    ).raise_for_status()


def _feed(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        for run, hot in ((RUN, True), (CALM, False)):
            c.put(run_path(run), json={"tags": {"test": "plot"}}).raise_for_status()
            series = _series(hot)
            for seq, lo in enumerate(range(0, STEPS, 50)):  # four batches, as an agent sends
                part = [
                    series_from_columns(
                        s.metric, s.labels, s.steps[lo : lo + 50], s.values[lo : lo + 50]
                    )
                    for s in series
                ]
                _post(c, run, part, seq)
        big = [5.0 - i / BIG_STEPS for i in range(BIG_STEPS)]
        big[BIG_NAN], big[BIG_INF] = math.nan, math.inf
        _post(c, BIG, [series_from_columns("loss", {}, range(BIG_STEPS), big)], 0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('plot') / 'lw.db'}"
    upgrade(db)
    with thread_server(create_app(load_settings(db_url=db))) as srv:
        _feed(srv.url)
        yield srv


def _cli(*argv: str, pre: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{pre}\nfrom logitwatch.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGITWATCH_")}
    return subprocess.run(
        [sys.executable, "-c", code, "plot", *argv],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def _series_lines(ax) -> list:
    return [a for a in ax.lines if a.get_gid() == "series"]


def _xs(ax, gid: str) -> set[float]:
    return {float(x) for a in ax.lines if a.get_gid() == gid for x in a.get_xdata()}


def test_plot_command_writes_the_picture(server, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "sub" / "run.png"  # a missing folder is made
    proc = subprocess.run(
        [sys.executable, "-m", "logitwatch", "plot", RUN, "--server", server.url, "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "5 panels" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(out)
    height = round(DPI * (PANEL_IN * len(DEFAULT_METRICS) + MARGIN_IN))
    assert pixels.shape[:2] == (height, round(DPI * WIDTH_IN)) == (1050, 1000)
    assert pixels[..., :3].std() > 0.05  # drawn on, not a blank page


def test_figure_has_the_stability_panels_layers_alerts_and_the_nan(server):
    with ApiClient(server.url) as api:
        alerts = api.alerts(run=RUN)
        fig = figure(api, [RUN])
    fired = {a["rule"]: a for a in alerts}
    assert fired["nonfinite"]["first_step"] == NAN_STEP and "attn-logit-high" in fired
    loss, _, attn, _, grad = fig.axes
    titles = [ax.get_title(loc="left").split(":")[0] for ax in fig.axes]
    assert titles == list(DEFAULT_METRICS)
    # one line per layer (heads folded to their max), labelled; global + per-layer grad norms
    assert [len(_series_lines(ax)) for ax in fig.axes] == [1, 1, 2, 1, 3]
    assert [a.get_label() for a in _series_lines(attn)] == ["layer 0", "layer 1"]
    assert [a.get_label() for a in _series_lines(grad)] == ["global", "layer 0", "layer 1"]
    assert "max over heads" in attn.get_title(loc="left")
    assert (attn.get_yscale(), grad.get_yscale(), loss.get_yscale()) == ("log", "log", "linear")
    # the NaN loss: a gap in the line, an X at its step, a critical alert line at its step
    (line,) = _series_lines(loss)
    steps, values = list(line.get_xdata()), list(line.get_ydata())
    assert math.isnan(values[steps.index(NAN_STEP)]) and len(steps) == STEPS
    assert _xs(loss, "nonfinite") == {NAN_STEP}
    assert any("NaN @ 150" in t.get_text() for t in loss.texts)
    for ax in fig.axes:  # every panel shows when the run went wrong
        assert NAN_STEP in _xs(ax, "alert:critical")
    high = fired["attn-logit-high"]
    assert alert_step(high) in _xs(attn, "alert:warning")  # fired_step where the service has it
    assert any(t.get_text() == "attn-logit-high" for t in attn.texts)  # named on its panel
    # layer 0's runaway is drawn: its max is far above layer 1's
    l0, l1 = _series_lines(attn)
    assert max(l0.get_ydata()) > 100 > max(l1.get_ydata())


def test_two_runs_overlaid_and_a_step_window(server, tmp_path):
    with ApiClient(server.url) as api:
        fig = figure(api, [RUN, CALM], since=100, until=180)
        path = plot_runs(api, [RUN, CALM], metrics=["loss"], out=tmp_path / "two.svg")
    assert path.read_text().lstrip().startswith("<?xml")
    loss, _, attn, _, _ = fig.axes
    assert [a.get_label() for a in _series_lines(loss)] == [RUN, CALM]
    assert [a.get_linestyle() for a in _series_lines(loss)] == ["-", "--"]
    assert len(_series_lines(attn)) == 4  # 2 runs x 2 layers
    assert [a.get_label() for a in _series_lines(attn)][2] == f"{CALM}: layer 0"
    for a in _series_lines(loss):
        assert min(a.get_xdata()) == 100 and max(a.get_xdata()) == 180
    assert loss.get_xlim() == (100, 180)
    assert "vs" in fig._suptitle.get_text() and "steps 100-180" in fig._suptitle.get_text()


def test_a_long_run_is_drawn_from_buckets_and_its_nan_stays(server):
    with ApiClient(server.url) as api:
        fig = figure(api, [BIG], metrics=["loss", "grad.norm"])
    loss, grad = fig.axes
    (line,) = _series_lines(loss)
    assert len(line.get_xdata()) <= 1000  # one point per bucket, not 50,000
    assert len(loss.collections) == 1  # the min-max band of each bucket
    nan_at, inf_at = sorted(_xs(loss, "nonfinite"))
    width = BIG_STEPS / 1000 + 1
    assert nan_at <= BIG_NAN < nan_at + width and inf_at <= BIG_INF < inf_at + width  # its bucket
    # each labelled with its bucket's steps: somewhere in there
    marks = sorted(t.get_text() for t in loss.texts if " @ " in t.get_text())
    assert marks == [
        f"+Inf @ {inf_at:.0f}-{inf_at + 49:.0f}",
        f"NaN @ {nan_at:.0f}-{nan_at + 49:.0f}",
    ]
    # a metric the run lacks: the panel says so instead of failing
    assert not _series_lines(grad)
    assert any("has no 'grad.norm'" in t.get_text() for t in grad.texts)


def test_missing_metric_is_reported_and_the_rest_drawn(server, tmp_path):
    out = tmp_path / "m.png"
    proc = _cli(RUN, "--metrics", "loss,no.such", "--server", server.url, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (
        "run 'plot-hot' has no metric 'no.such' (it has: attn.logit_max, grad.norm" in proc.stderr
    )
    assert out.is_file() and "2 panels" in proc.stdout


def test_unknown_run_fails_naming_it(server, tmp_path):
    proc = _cli("no-such-run", "--server", server.url, "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 1
    assert "run 'no-such-run' does not exist" in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--since", "abc"], "--since"),
        (["--until", "-5"], "--until"),
        (["--since", "50", "--until", "10"], "--since 50 is after --until 10"),
        (["--metrics", "Loss"], "--metrics"),
        (["--max-points", "0"], "--max-points"),
        (["-o", "run.jpeg"], "-o/--out"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_flag(argv, flag):
    proc = _cli(RUN, *argv)
    assert proc.returncode == 2, proc.stderr
    assert flag in proc.stderr and "Traceback" not in proc.stderr


def test_without_matplotlib_it_says_what_to_install(server, tmp_path):
    proc = _cli(RUN, "--server", server.url, "-o", str(tmp_path / "x.png"),
                pre="sys.modules['matplotlib'] = None")  # fmt: skip
    assert proc.returncode == 1
    assert "pip install 'logitwatch[plot]'" in proc.stderr and "Traceback" not in proc.stderr


def test_the_readme_plot_commands_run(server, tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [
        line.split("  #")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
        for line in block.splitlines()
        if line.startswith("logitwatch plot ")
    ]
    assert len(lines) >= 3
    for line in lines:
        argv = [{"my-run": RUN, "other-run": CALM}.get(w, w) for w in shlex.split(line)[2:]]
        proc = subprocess.run(
            [sys.executable, "-m", "logitwatch", "plot", *argv, "--server", server.url],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, f"{line}\n{proc.stderr}"
        out = argv[argv.index("-o") + 1]
        assert (tmp_path / out).read_bytes()[:4] == b"\x89PNG", line
