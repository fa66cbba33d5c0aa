"""Builders shared by the dashboards: data sources, the panel grid, queries, panels and the board.

A library only: fleet.py and deepdive.py build from it, and build.py writes their JSON.
"""

from __future__ import annotations

from typing import Any

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


MARKERS = "Z"  # refId of the alert-marker query on each XY chart
SPLIT = {  # one frame (one line) per distinct value of the `series` column
    "id": "partitionByValues",
    "options": {"fields": ["series"], "keepFields": False, "naming": {"asLabels": True}},
}
MARKER_OVERRIDE = {
    "matcher": {"id": "byFrameRefID", "options": MARKERS},
    "properties": [
        {"id": "custom.show", "value": "points"},
        {"id": "custom.pointSize", "value": {"fixed": 10}},
        {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
        {"id": "displayName", "value": "alert"},
    ],
}


def prom(ref: str, expr: str, legend_format: str = "", *, instant: bool = False) -> Json:
    return {
        "refId": ref,
        "datasource": ds(PROMETHEUS),
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend_format,
        "range": not instant,
        "instant": instant,
        "format": "table" if instant else "time_series",
    }


def sql(ref: str, raw: str, fmt: str = "table") -> Json:
    return {
        "refId": ref,
        "datasource": ds(POSTGRES),
        "editorMode": "code",
        "format": fmt,
        "rawQuery": True,
        "rawSql": raw,
    }


def _panel(kind: str, title: str, description: str, targets: list[Json], **rest: Json) -> Json:
    source = targets[0]["datasource"]
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": source,
        "targets": targets,
        **rest,
    }


def timeseries(
    title: str,
    description: str,
    targets: list[Json],
    unit: str = "short",
    *,
    limits: tuple[float, float] | None = None,
    log: bool = False,
) -> Json:
    """Lines over wall time; `limits` draws a warning and a critical threshold line."""
    custom = {
        "drawStyle": "line",
        "lineInterpolation": "linear",
        "lineWidth": 1,
        "fillOpacity": 0,
        "showPoints": "never",
        "spanNulls": False,
        "axisPlacement": "auto",
        "scaleDistribution": {"type": "log", "log": 10} if log else {"type": "linear"},
        "thresholdsStyle": {"mode": "line" if limits else "off"},
    }
    defaults = field_defaults(unit, custom)
    if limits:
        defaults["thresholds"] = thresholds(
            (None, "green"), (limits[0], "orange"), (limits[1], "red")
        )
    return _panel(
        "timeseries",
        title,
        description,
        targets,
        fieldConfig={"defaults": defaults, "overrides": []},
        options={"legend": legend("bottom"), "tooltip": tooltip()},
    )


def stat(title: str, description: str, targets: list[Json]) -> Json:
    defaults = {
        "color": {"mode": "thresholds"},
        "unit": "none",
        "thresholds": thresholds((None, "green"), (1, "red")),
    }
    options = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "orientation": "auto",
        "textMode": "value_and_name",
        "colorMode": "background",
        "graphMode": "none",
        "justifyMode": "auto",
        "wideLayout": True,
        "showPercentChange": False,
        "percentChangeColorMode": "standard",
    }
    return _panel(
        "stat",
        title,
        description,
        targets,
        fieldConfig={"defaults": defaults, "overrides": []},
        options=options,
    )


def table(
    title: str,
    description: str,
    targets: list[Json],
    *,
    links: dict[str, tuple[str, str]],
    transformations: list[Json] | None = None,
) -> Json:
    """A table; `links` maps a column to (link title, URL) for a data link on its cells."""
    overrides = [
        {
            "matcher": {"id": "byName", "options": column},
            "properties": [{"id": "links", "value": [{"title": text, "url": url}]}],
        }
        for column, (text, url) in links.items()
    ]
    custom = {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False}
    return _panel(
        "table",
        title,
        description,
        targets,
        transformations=transformations or [],
        fieldConfig={"defaults": {"custom": custom}, "overrides": overrides},
        options={"showHeader": True, "cellHeight": "sm", "frameIndex": 0},
    )


def xy(
    title: str,
    description: str,
    queries: list[str],
    markers: str,
    *,
    split: bool = False,
    unit: str = "short",
    log: bool = False,
) -> Json:
    """Lines against the training step (column `step`), red points at alerts from `markers` SQL.

    `split`: the queries return a `series` column, and each of its values becomes a line.
    """
    targets = [sql(chr(ord("A") + i), q) for i, q in enumerate(queries)] + [sql(MARKERS, markers)]
    custom = {
        "show": "lines",
        "lineWidth": 1,
        "pointSize": {"fixed": 4},
        "axisPlacement": "auto",
        "axisLabel": "",
        "scaleDistribution": {"type": "log", "log": 10} if log else {"type": "linear"},
        "hideFrom": {"legend": False, "tooltip": False, "viz": False},
    }
    defaults = field_defaults(unit, custom)
    if split:
        defaults["displayName"] = "${__field.labels.series}"
    options = {
        "mapping": "auto",
        "series": [{"x": {"matcher": {"id": "byName", "options": "step"}}}],
        "legend": legend("bottom"),
        "tooltip": tooltip("single"),
    }
    return _panel(
        "xychart",
        title,
        description,
        targets,
        transformations=[SPLIT] if split else [],
        fieldConfig={"defaults": defaults, "overrides": [MARKER_OVERRIDE]},
        options=options,
    )
