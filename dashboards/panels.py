"""Panel builders shared by the dashboards: queries, time series, stats, tables and XY charts."""

from __future__ import annotations

from build import POSTGRES, PROMETHEUS, Json, ds, field_defaults, legend, thresholds, tooltip

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
