"""The dashboards as files: generated from code, fixed uids, data sources only by variable, real metric names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from logitwatch.metrics import CATALOGUE, prometheus_name

REPO = Path(__file__).resolve().parents[2]
DASH = REPO / "dashboards"
BOARDS = {"fleet-overview.json": "logitwatch-fleet", "run-deep-dive.json": "logitwatch-run"}
SERVICE_METRICS = {
    "logitwatch_alerts_firing",
    "logitwatch_points_ingested_total",
    "logitwatch_http_requests_total",
    "logitwatch_http_request_duration_seconds_bucket",
}


def load(name: str) -> dict:
    return json.loads((DASH / name).read_text())


def walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_json_files_are_what_the_code_generates(tmp_path):
    proc = subprocess.run(  # from another folder: the script must not depend on the cwd
        [sys.executable, str(DASH / "build.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


def test_dashboard_modules_never_import_the_entry_point():
    # build.py imports them and writes the JSON; an import back would be a circle.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import deepdive, fleet, panels; "
        "fleet.build(); deepdive.build(); assert 'build' not in sys.modules, 'imports build.py'"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(DASH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", BOARDS)
def test_fixed_uid_and_datasources_only_through_variables(name):
    board = load(name)
    assert board["uid"] == BOARDS[name]
    ds_vars = {
        v["name"]: v["query"] for v in board["templating"]["list"] if v["type"] == "datasource"
    }
    assert ds_vars
    refs = [n["datasource"] for n in walk(board) if isinstance(n.get("datasource"), dict)]
    assert refs
    for ref in refs:
        if ref["type"] == "grafana":  # the built-in annotation source, present in every dashboard
            continue
        var = re.fullmatch(r"\$\{(\w+)\}", ref["uid"])
        assert var, f"hard-coded data source {ref}"
        assert ds_vars[var.group(1)] == ref["type"]


@pytest.mark.parametrize("name", BOARDS)
def test_panels_have_unique_ids_and_do_not_overlap(name):
    panels = load(name)["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine


def test_fleet_queries_name_catalogue_and_service_metrics():
    exprs = [t["expr"] for t in walk(load("fleet-overview.json")) if "expr" in t]
    names = {n for e in exprs for n in re.findall(r"\blogitwatch_\w+", e)}
    known = {prometheus_name(m) for m in CATALOGUE} | SERVICE_METRICS
    assert names <= known, names - known
    assert names >= SERVICE_METRICS


def test_deep_dive_queries_name_catalogue_metrics():
    sql = " ".join(t["rawSql"] for t in walk(load("run-deep-dive.json")) if "rawSql" in t)
    metrics = set(re.findall(r"logitwatch_points\('\$run', '([\w.]+)'", sql))
    metrics |= {
        m
        for group in re.findall(r"metric IN \(([^)]*)\)", sql)
        for m in re.findall(r"'([\w.]+)'", group)
    }
    assert metrics <= set(CATALOGUE), metrics - set(CATALOGUE)
    wanted = {
        "loss",
        "loss.z",
        "lr",
        "logz.mean",
        "logz.max",
        "logits.max_abs",
        "attn.logit_max",
        "attn.entropy_min",
        "attn.q_norm",
        "attn.k_norm",
        "grad.norm",
        "update.ratio",
        "act.rms",
    }
    assert wanted <= metrics


def test_deep_dive_x_axis_is_the_step():
    board = load("run-deep-dive.json")
    charts = [p for p in board["panels"] if p["type"] == "xychart"]
    assert len(charts) >= 9
    for p in charts:
        assert p["options"]["series"][0]["x"]["matcher"] == {"id": "byName", "options": "step"}
        for t in p["targets"]:
            assert re.match(r"SELECT step,", t["rawSql"]), t["rawSql"]
