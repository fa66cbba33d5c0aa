"""Run deep-dive (PostgreSQL): every probe of one run against the training step, alerts at their step.

Charts are XY charts with the step as x (Grafana's time series and trend panels plot wall
time or draw no annotations). Alerts appear twice: as red points at their step on the
panel of their metric, and as annotations at their wall time on the progress panel.
SQL reads logitwatch_points() and logitwatch_alerts from migration 0003_views.
"""

from __future__ import annotations

from build import (
    FLEET_UID,
    POSTGRES,
    RUN_UID,
    Grid,
    Json,
    dashboard,
    dashboard_link,
    ds,
    ds_variable,
    field_defaults,
    legend,
    tooltip,
)

STEPS = "'$step_min', '$step_max'"
IN_RANGE = (
    "step >= coalesce(NULLIF('$step_min', '')::bigint, step)"
    " AND step <= coalesce(NULLIF('$step_max', '')::bigint, step)"
)
MARKERS = "Z"  # refId of the alert-marker query on each chart


def points(metric: str, column: str = "value", name: str | None = None) -> str:
    """One series: SELECT step, <column> AS <name> for a metric without labels."""
    alias = name or metric
    return f"SELECT step, {column} AS \"{alias}\" FROM logitwatch_points('$run', '{metric}', {STEPS}) ORDER BY step"


def per_layer(
    metric: str, column: str = "value", prefix: str = "layer ", reduce: str = "max"
) -> str:
    """One series per layer (reduced over heads); `series` is split into frames by partitionByValues."""
    return (
        f"SELECT step, coalesce('{prefix}' || layer, 'global') AS series, {reduce}({column}) AS value "
        f"FROM logitwatch_points('$run', '{metric}', {STEPS}) "
        "GROUP BY step, layer ORDER BY layer NULLS FIRST, step"
    )


def markers(*metrics: str) -> str:
    names = ", ".join(f"'{m}'" for m in metrics)
    return (
        'SELECT step, step_value AS "alert" FROM logitwatch_alerts '
        f"WHERE run = '$run' AND metric IN ({names}) AND {IN_RANGE} ORDER BY step"
    )


def sql(ref: str, raw: str, fmt: str = "table") -> Json:
    return {
        "refId": ref,
        "datasource": ds(POSTGRES),
        "editorMode": "code",
        "format": fmt,
        "rawQuery": True,
        "rawSql": raw,
    }


PARTITION = {
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


def xy(
    title: str,
    description: str,
    queries: list[str],
    alert_metrics: tuple[str, ...],
    *,
    split: bool = False,
    unit: str = "short",
    log: bool = False,
) -> Json:
    targets = [sql(chr(ord("A") + i), q) for i, q in enumerate(queries)]
    targets.append(sql(MARKERS, markers(*alert_metrics)))
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
    return {
        "type": "xychart",
        "title": title,
        "description": description,
        "datasource": ds(POSTGRES),
        "targets": targets,
        "transformations": [PARTITION] if split else [],
        "fieldConfig": {"defaults": defaults, "overrides": [MARKER_OVERRIDE]},
        "options": {
            "mapping": "auto",
            "series": [{"x": {"matcher": {"id": "byName", "options": "step"}}}],
            "legend": legend("bottom"),
            "tooltip": tooltip("single"),
        },
    }


def table(title: str, description: str, raw: str, links: dict[str, str] | None = None) -> Json:
    overrides = [
        {
            "matcher": {"id": "byName", "options": col},
            "properties": [{"id": "links", "value": [{"title": title, "url": url}]}],
        }
        for col, url in (links or {}).items()
    ]
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": ds(POSTGRES),
        "targets": [sql("A", raw)],
        "fieldConfig": {
            "defaults": {
                "custom": {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False}
            },
            "overrides": overrides,
        },
        "options": {
            "showHeader": True,
            "cellHeight": "sm",
            "frameIndex": 0,
        },
    }


ALERTS_SQL = (
    "SELECT step, rule, severity, state, metric, labels, value, threshold, hint, fired_at, "
    "GREATEST(step - 200, 0) AS zoom_from, step + 200 AS zoom_to "
    "FROM logitwatch_alerts WHERE run = '$run' ORDER BY step, id"
)
# ${run:queryparam} expands to var-run=<run>, url-encoded.
ZOOM_LINK = (
    f"/d/{RUN_UID}/run-deep-dive?${{run:queryparam}}"
    "&var-step_min=${__data.fields.zoom_from}&var-step_max=${__data.fields.zoom_to}&${__url_time_range}"
)
CONFIG_SQL = (
    "SELECT c.key AS setting, c.value FROM runs r, jsonb_each_text(r.config) c "
    "WHERE r.name = '$run' ORDER BY 1"
)
PROGRESS_SQL = (
    "SELECT \"time\", step FROM logitwatch_points('$run', 'loss', '$step_min', '$step_max') "
    'WHERE $__timeFilter("time") ORDER BY 1'
)
ANNOTATION_SQL = (
    'SELECT created_at AS "time", resolved_at AS timeend, '
    "format('%s %s on %s %s at step %s: %s', severity, rule, metric, labels, step, hint) AS text, "
    "severity || ',' || rule AS tags "
    "FROM logitwatch_alerts WHERE run = '$run' AND $__timeFilter(created_at) ORDER BY 1"
)


def progress() -> Json:
    custom = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 0,
        "showPoints": "never",
        "spanNulls": False,
        "axisPlacement": "auto",
        "scaleDistribution": {"type": "linear"},
    }
    return {
        "type": "timeseries",
        "title": "Progress over wall time (alerts as annotations)",
        "description": "Training step against wall time: stalls and restarts show here, with alerts at the time they fired.",
        "datasource": ds(POSTGRES),
        "targets": [sql("A", PROGRESS_SQL, "time_series")],
        "fieldConfig": {"defaults": field_defaults("none", custom), "overrides": []},
        "options": {"legend": legend("bottom"), "tooltip": tooltip("single")},
    }


def build() -> Json:
    g = Grid()
    g.row("Loss and logits")
    g.add(
        xy(
            "Loss and z-loss",
            "Train loss and the z-loss term (when on).",
            [points("loss", "value_max"), points("loss.z", "value_max", "z-loss")],
            ("loss", "loss.ce", "loss.z", "nonfinite.count"),
        ),
        12,
        8,
    )
    g.add(
        xy(
            "Learning rate",
            "Read from the optimizer, per param group.",
            [
                "SELECT step, coalesce(NULLIF(labels, ''), 'lr') AS series, value "
                f"FROM logitwatch_points('$run', 'lr', {STEPS}) ORDER BY labels, step"
            ],
            ("lr",),
            split=True,
            unit="sci",
        ),
        12,
        8,
    )
    g.add(
        xy(
            "log Z mean and max",
            "log Z = logsumexp of the output logits; z-loss keeps it near 0.",
            [
                points("logz.mean", "value", "log Z mean"),
                points("logz.max", "value_max", "log Z max"),
            ],
            ("logz.mean", "logz.max", "logz.std", "logz.min"),
        ),
        12,
        8,
    )
    g.add(
        xy(
            "Output logits max |logit|",
            "Before soft-capping.",
            [points("logits.max_abs", "value_max", "max |logit|")],
            ("logits.max_abs", "logits.rms"),
        ),
        12,
        8,
    )

    g.row("Attention")
    g.add(
        xy(
            "Attention max logit per layer",
            "Max over heads of q.k/sqrt(d), before soft-capping.",
            [per_layer("attn.logit_max", "value_max")],
            ("attn.logit_max",),
            split=True,
        ),
        8,
        9,
    )
    g.add(
        xy(
            "Attention entropy (min per layer)",
            "Entropy collapse: one key takes all the attention.",
            [per_layer("attn.entropy_min", "value_min", reduce="min")],
            ("attn.entropy_min", "attn.entropy_mean", "attn.entropy_frac"),
            split=True,
        ),
        8,
        9,
    )
    g.add(
        xy(
            "q and k norms per layer",
            "RMS of queries and keys fed to the dot product.",
            [
                per_layer("attn.q_norm", prefix="q layer "),
                per_layer("attn.k_norm", prefix="k layer "),
            ],
            ("attn.q_norm", "attn.k_norm"),
            split=True,
        ),
        8,
        9,
    )

    g.row("Optimisation")
    g.add(
        xy(
            "Gradient norm",
            "Before clipping: global and per layer.",
            [per_layer("grad.norm", "value_max")],
            ("grad.norm",),
            split=True,
            log=True,
        ),
        8,
        8,
    )
    g.add(
        xy(
            "Update ratio",
            "||w_t - w_(t-1)|| / ||w_(t-1)||: global and per layer.",
            [per_layer("update.ratio", "value_max")],
            ("update.ratio",),
            split=True,
            log=True,
        ),
        8,
        8,
    )
    g.add(
        xy(
            "Residual RMS per layer",
            "Residual-stream RMS after each block.",
            [per_layer("act.rms", "value_max")],
            ("act.rms",),
            split=True,
        ),
        8,
        8,
    )

    g.row("Alerts and run")
    g.add(
        table(
            "Alerts",
            "Every alert of the run at its step; click the step to zoom there.",
            ALERTS_SQL,
            {"step": ZOOM_LINK},
        ),
        24,
        7,
    )
    g.add(progress(), 12, 7)
    g.add(table("Run configuration", "The hyperparameters the run reported.", CONFIG_SQL), 12, 7)

    run_var = {
        "name": "run",
        "label": "Run",
        "type": "query",
        "datasource": ds(POSTGRES),
        "query": "SELECT name FROM runs ORDER BY last_seen_at DESC NULLS LAST, name",
        "refresh": 1,
        "includeAll": False,
        "multi": False,
        "options": [],
        "regex": "",
        "sort": 0,
        "hide": 0,
        "skipUrlSync": False,
    }
    step_vars = [
        {
            "name": name,
            "label": label,
            "type": "textbox",
            "query": "",
            "current": {"text": "", "value": ""},
            "options": [],
            "hide": 0,
            "skipUrlSync": False,
            "description": "Empty means the whole run.",
        }
        for name, label in (("step_min", "From step"), ("step_max", "To step"))
    ]
    annotation = {
        "name": "Alerts",
        "datasource": ds(POSTGRES),
        "enable": True,
        "hide": False,
        "iconColor": "red",
        "target": sql("Anno", ANNOTATION_SQL),
    }
    return dashboard(
        uid=RUN_UID,
        title="logitwatch: run deep-dive",
        description="One run against the training step: loss, LR, log Z, logits, attention, gradients, alerts.",
        tags=["logitwatch"],
        panels=g.panels,
        variables=[ds_variable(POSTGRES, "PostgreSQL"), run_var, *step_vars],
        annotations=[annotation],
        time_from="now-7d",
        links=[dashboard_link("Fleet overview", FLEET_UID, f"/d/{FLEET_UID}/fleet-overview")],
    )
