"""Both dashboards type-check against Grafana's published schema (@grafana/schema) with tsc.

@grafana/schema ships the dashboard and panel schemas as TypeScript types generated from
Grafana's CUE kinds; it has no JSON Schema. So each dashboard is written into a .ts file as
an object literal typed with those types (excess properties are errors in TypeScript), and
each panel's options and custom field config are typed with its panel plugin's types.
The dashboard is typed with the package's `Dashboard` (the "veneer" Grafana's frontend
uses; the raw CUE type only knows the built-in annotation target), its annotation targets
with the generic parameter it offers. Query targets are data-source specific and the package
has no types for ours, so SQLQuery and Prometheus below are transcribed from Grafana's
source (packages/grafana-sql/src/types.ts, grafana-prometheus dataquery.gen.ts).
scripts/setup.sh installs the packages into .cache/npm.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NPM = REPO / ".cache" / "npm"
TSC = NPM / "node_modules" / "typescript" / "bin" / "tsc"
SCHEMA = NPM / "node_modules" / "@grafana" / "schema" / "package.json"
BOARDS = ["fleet-overview.json", "run-deep-dive.json"]
RAW = "@grafana/schema/dist/esm/raw"
# panel type -> (module under raw/composable, whether it has a custom field config)
PANEL_TYPES = {
    "timeseries": ("timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen", True),
    "stat": ("stat/panelcfg/x/StatPanelCfg_types.gen", False),
    "table": ("table/panelcfg/x/TablePanelCfg_types.gen", True),
    "xychart": ("xychart/panelcfg/x/XYChartPanelCfg_types.gen", True),
}
QUERY_TYPES = {"prometheus": "Prometheus", "grafana-postgresql-datasource": "SQLQuery"}

# JSON spells enum members by value: J<T> turns every string enum of T into the union of its
# values (`${E}`) and leaves everything else as it is; numeric enums accept number literals.
PRELUDE = (
    "import type { AnnotationQuery, Dashboard, DataQuery } from '@grafana/schema';\n"
    + "".join(
        f"import type * as {t} from '{RAW}/composable/{m}';\n" for t, (m, _) in PANEL_TYPES.items()
    )
    + """
type J<T> = 0 extends 1 & T ? T
  : T extends string ? (string extends T ? string : `${T}`)
  : T extends number | boolean | null | undefined ? T
  : T extends ReadonlyArray<infer U> ? Array<J<U>>
  : T extends object ? { [K in keyof T]: J<T[K]> }
  : T;
interface SQLQuery extends DataQuery {
  alias?: string; format?: 'time_series' | 'table'; rawSql?: string; dataset?: string;
  table?: string; sql?: object; editorMode?: 'builder' | 'code'; rawQuery?: boolean;
}
interface Prometheus extends DataQuery {
  editorMode?: 'builder' | 'code'; exemplar?: boolean; expr: string;
  format?: 'time_series' | 'table' | 'heatmap'; instant?: boolean; intervalFactor?: number;
  legendFormat?: string; range?: boolean; interval?: string;
}
type Board = Omit<Dashboard, 'annotations'> & { annotations?: { list?: AnnotationQuery<SQLQuery>[] } };
"""
)
TSCONFIG = {
    "compilerOptions": {
        "strict": True,
        "noEmit": True,
        "module": "esnext",
        "moduleResolution": "bundler",
        "target": "es2022",
        "types": [],
    }
}


def _all_panels(board: dict) -> list[dict]:
    out = []
    for panel in board.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def typescript_for(name: str, board: dict) -> str:
    """One const per checked object, named so that tsc's errors say which one failed."""
    ident = re.sub(r"\W", "_", name)
    lines = [f"export const {ident}_board: J<Board> = {json.dumps(board)};"]
    for panel in _all_panels(board):
        kind = panel["type"]
        if kind == "row":
            continue
        assert kind in PANEL_TYPES, f"{name}: panel type {kind!r} has no schema mapped here"
        pid = f"{ident}_panel{panel['id']}"
        query = QUERY_TYPES[panel["datasource"]["type"]]
        lines.append(f"export const {pid}_targets: J<{query}>[] = {json.dumps(panel['targets'])};")
        lines.append(
            f"export const {pid}_options: J<{kind}.Options> = {json.dumps(panel['options'])};"
        )
        custom = panel["fieldConfig"]["defaults"].get("custom", {})
        if not PANEL_TYPES[kind][1]:
            assert not custom, f"{name}: {kind} panels have no custom field config"
            continue
        lines.append(f"export const {pid}_custom: J<{kind}.FieldConfig> = {json.dumps(custom)};")
        for i, override in enumerate(panel["fieldConfig"]["overrides"]):
            props = {
                p["id"].removeprefix("custom."): p["value"]
                for p in override["properties"]
                if p["id"].startswith("custom.")
            }
            lines.append(
                f"export const {pid}_override{i}: Partial<J<{kind}.FieldConfig>> = {json.dumps(props)};"
            )
    return "\n".join(lines) + "\n"


def run_tsc(files: dict[str, str]) -> str:
    if not (TSC.is_file() and SCHEMA.is_file()):
        pytest.fail(
            "the Grafana schema packages are missing: run scripts/setup.sh "
            "(npm install --prefix .cache/npm @grafana/schema@13.2.3 typescript@5.9.3)"
        )
    # Inside .cache/npm so that module resolution finds its node_modules.
    with tempfile.TemporaryDirectory(dir=NPM, prefix="check-") as tmp:
        work = Path(tmp)
        config = {**TSCONFIG, "files": sorted(files)}
        (work / "tsconfig.json").write_text(json.dumps(config))
        for fname, body in files.items():
            (work / fname).write_text(PRELUDE + body)
        proc = subprocess.run(
            ["node", str(TSC), "-p", str(work / "tsconfig.json"), "--pretty", "false"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return proc.stdout + proc.stderr


def load(name: str) -> dict:
    return json.loads((REPO / "dashboards" / name).read_text())


def spoil(board: dict) -> dict[str, dict]:
    """Three copies, each with one mistake the schema must catch."""
    xy = next(p for p in _all_panels(board) if p["type"] == "xychart")
    bad_enum = copy.deepcopy(board)
    next(p for p in _all_panels(bad_enum) if p["id"] == xy["id"])["options"]["legend"][
        "displayMode"
    ] = "sideways"
    bad_key = copy.deepcopy(board)
    next(p for p in _all_panels(bad_key) if p["id"] == xy["id"])["gridPos"]["width"] = 12
    bad_type = copy.deepcopy(board)
    bad_type["graphTooltip"] = "shared"
    return {"bad_enum": bad_enum, "bad_key": bad_key, "bad_type": bad_type}


def test_dashboards_match_grafana_schema_and_the_check_has_teeth():
    good = "".join(typescript_for(name, load(name)) for name in BOARDS)
    bad = "".join(typescript_for(n, b) for n, b in spoil(load("run-deep-dive.json")).items())
    out = run_tsc({"good.ts": good, "bad.ts": bad})
    errors = re.findall(r"(\w+)\.ts\((\d+),\d+\): error TS", out)
    assert errors, out
    assert {f for f, _ in errors} == {"bad"}, out
    # Each spoiled copy fails on its own line: an unknown enum value, key, and type.
    offset = PRELUDE.count("\n")
    bad_lines = bad.splitlines()
    names = {bad_lines[int(n) - 1 - offset].split(":")[0].split()[-1] for _, n in errors}
    assert len(names) == 3, out
    assert any(n.startswith("bad_enum_panel") and n.endswith("_options") for n in names), out
    assert {"bad_key_board", "bad_type_board"} < names, out
