"""Write the Grafana dashboards of logitwatch as JSON: `python dashboards/build.py [--check]`.

The dashboards are code (fleet.py, deepdive.py, with the small builders below); the JSON
files next to this script are what Grafana provisions. `--check` fails when they are stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROMETHEUS = "prometheus"
POSTGRES = "grafana-postgresql-datasource"
#: Matches the datasource uids in provisioning/datasources/logitwatch.yaml only by variable:
#: panels name the variable, never a data-source id, so an imported dashboard asks for one.
DS_VARS = {PROMETHEUS: "DS_PROMETHEUS", POSTGRES: "DS_POSTGRES"}
SCHEMA_VERSION = 42  # Grafana 13's dashboard schema (@grafana/schema 13.2.x)
FLEET_UID = "logitwatch-fleet"
RUN_UID = "logitwatch-run"

Json = dict[str, Any]


def ds(kind: str) -> Json:
    return {"type": kind, "uid": f"${{{DS_VARS[kind]}}}"}


def ds_variable(kind: str, label: str) -> Json:
    return {
        "name": DS_VARS[kind],
        "label": label,
        "type": "datasource",
        "query": kind,
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


class Grid:
    """Places panels left to right in a 24-column grid, wrapping rows; assigns panel ids."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.next_id = 1
        self.panels: list[Json] = []

    def add(self, panel: Json, w: int, h: int) -> Json:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel = {"id": self.next_id, "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h}, **panel}
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)
        self.panels.append(panel)
        return panel

    def row(self, title: str) -> None:
        self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0


def legend(placement: str = "bottom", mode: str = "list") -> Json:
    return {"displayMode": mode, "placement": placement, "showLegend": True, "calcs": []}


def tooltip(mode: str = "multi") -> Json:
    return {"mode": mode, "sort": "desc"}


def field_defaults(unit: str | None = None, custom: Json | None = None, **extra: Any) -> Json:
    defaults: Json = {"color": {"mode": "palette-classic"}, "custom": custom or {}, **extra}
    if unit:
        defaults["unit"] = unit
    return defaults


def thresholds(*steps: tuple[float | None, str]) -> Json:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def dashboard(
    *,
    uid: str,
    title: str,
    description: str,
    tags: list[str],
    panels: list[Json],
    variables: list[Json],
    annotations: list[Json],
    time_from: str,
    links: list[Json],
) -> Json:
    builtin = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": tags,
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "weekStart": "",
        "links": links,
        "annotations": {"list": [builtin, *annotations]},
        "templating": {"list": variables},
        "panels": panels,
    }


def dashboard_link(title: str, uid: str, url: str) -> Json:
    return {
        "title": title,
        "type": "link",
        "url": url,
        "icon": "dashboard",
        "tooltip": f"open {title}",
        "asDropdown": False,
        "includeVars": False,
        "keepTime": True,
        "tags": [],
        "targetBlank": False,
    }


def render(board: Json) -> str:
    return json.dumps(board, indent=2, sort_keys=False) + "\n"


def outputs() -> dict[Path, str]:
    import deepdive
    import fleet

    return {
        HERE / "fleet-overview.json": render(fleet.build()),
        HERE / "run-deep-dive.json": render(deepdive.build()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a JSON file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python dashboards/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
