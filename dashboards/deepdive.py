"""Run deep-dive (PostgreSQL): every probe of one run against the training step, alerts at their step.

Charts are XY charts with the step as x (Grafana's time series plots wall time, and its trend
panel draws no annotations). Alerts appear as red points at the step they fired on the chart of
their metric, in a table with a link that zooms to that step, and as annotations at the wall
time they fired on the progress panel. SQL reads logitwatch_points() and logitwatch_alerts from
migrations 0003_views and 0006 (fired_step); `$step_min`/`$step_max` (empty: the whole run)
narrow every chart.
"""

from __future__ import annotations

from panels import (
    FLEET_UID,
    POSTGRES,
    RUN_UID,
    Grid,
    Json,
    dashboard,
    dashboard_link,
    ds,
    ds_variable,
    sql,
    table,
    timeseries,
    xy,
)

STEPS = "'$step_min', '$step_max'"
IN_RANGE = (
    "step >= coalesce(NULLIF('$step_min', '')::bigint, step)"
    " AND step <= coalesce(NULLIF('$step_max', '')::bigint, step)"
)
ZOOM = 200  # steps either side of an alert that its link shows


def points(metric: str, column: str = "value", name: str | None = None) -> str:
    """One line: `column` of logitwatch_points (value, value_min, value_max) named `name`."""
    source = f"logitwatch_points('$run', '{metric}', {STEPS})"
    return f'SELECT step, {column} AS "{name or metric}" FROM {source} ORDER BY step'


def per_layer(
    metric: str, column: str = "value", prefix: str = "layer ", reduce: str = "max"
) -> str:
    """One line per layer (heads reduced with `reduce`), 'global' for the unlabelled series."""
    return (
        f"SELECT step, coalesce('{prefix}' || layer, 'global') AS series, {reduce}({column}) AS value "
        f"FROM logitwatch_points('$run', '{metric}', {STEPS}) "
        "GROUP BY step, layer ORDER BY layer NULLS FIRST, step"
    )


def alerts_on(*metrics: str) -> str:
    """Markers: each alert on these metrics that fired, at the step it fired and its series'
    value there (rows from before fired_step was recorded: where the alert began)."""
    names = ", ".join(f"'{m}'" for m in metrics)
    return (
        'SELECT step, "alert" FROM (SELECT coalesce(fired_step, step) AS step, '
        'coalesce(fired_value, step_value) AS "alert" FROM logitwatch_alerts '
        f"WHERE run = '$run' AND metric IN ({names}) AND fired_at IS NOT NULL) fired "
        f"WHERE {IN_RANGE} ORDER BY step"
    )


# The step an alert fired at (where it began while pending, or on rows from before 0006).
FIRED = "coalesce(fired_step, step)"
ALERTS_SQL = (
    f"SELECT {FIRED} AS fired_step, step AS first_step, rule, severity, state, metric, labels, "
    "value, threshold, hint, fired_at, "
    f"GREATEST({FIRED} - {ZOOM}, 0) AS zoom_from, {FIRED} + {ZOOM} AS zoom_to "
    f"FROM logitwatch_alerts WHERE run = '$run' ORDER BY {FIRED}, id"
)
# ${run:queryparam} expands to var-run=<run>, url-encoded.
ZOOM_LINK = (
    f"/d/{RUN_UID}/run-deep-dive?${{run:queryparam}}&var-step_min=${{__data.fields.zoom_from}}"
    "&var-step_max=${__data.fields.zoom_to}&${__url_time_range}"
)
CONFIG_SQL = (
    "SELECT c.key AS setting, c.value FROM runs r, jsonb_each_text(r.config) c "
    "WHERE r.name = '$run' ORDER BY 1"
)
PROGRESS_SQL = (
    f"SELECT \"time\", step FROM logitwatch_points('$run', 'loss', {STEPS}) "
    'WHERE $__timeFilter("time") ORDER BY 1'
)
ANNOTATION_SQL = (
    'SELECT fired_at AS "time", resolved_at AS timeend, '
    "format('%s %s on %s %s fired at step %s (from step %s): %s', severity, rule, metric, "
    f"labels, {FIRED}, step, hint) AS text, "
    "severity || ',' || rule AS tags "
    "FROM logitwatch_alerts WHERE run = '$run' AND $__timeFilter(fired_at) ORDER BY 1"
)
LR_SQL = (
    "SELECT step, coalesce(NULLIF(labels, ''), 'lr') AS series, value "
    f"FROM logitwatch_points('$run', 'lr', {STEPS}) ORDER BY labels, step"
)


def variables() -> list[Json]:
    run = {
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
    steps = [
        {"name": name, "label": label, "type": "textbox", "query": "",
         "current": {"text": "", "value": ""}, "options": [], "hide": 0, "skipUrlSync": False,
         "description": "Empty means the whole run."}
        for name, label in (("step_min", "From step"), ("step_max", "To step"))
    ]  # fmt: skip
    return [ds_variable(POSTGRES, "PostgreSQL"), run, *steps]


def build() -> Json:
    g = Grid()
    g.row("Loss and logits")
    g.add(xy("Loss and z-loss", "Train loss and the z-loss term (when on).",
             [points("loss", "value_max"), points("loss.z", "value_max", "z-loss")],
             alerts_on("loss", "loss.ce", "loss.z", "nonfinite.count")), 12, 8)  # fmt: skip
    g.add(xy("Learning rate", "Read from the optimizer, per param group.", [LR_SQL],
             alerts_on("lr"), split=True, unit="sci"), 12, 8)  # fmt: skip
    g.add(xy("log Z mean and max", "log Z = logsumexp of the output logits; z-loss keeps it near 0.",
             [points("logz.mean", "value", "log Z mean"), points("logz.max", "value_max", "log Z max")],
             alerts_on("logz.mean", "logz.max", "logz.std", "logz.min")), 12, 8)  # fmt: skip
    g.add(xy("Output logits max |logit|", "Before soft-capping.",
             [points("logits.max_abs", "value_max", "max |logit|")],
             alerts_on("logits.max_abs", "logits.rms")), 12, 8)  # fmt: skip

    g.row("Attention")
    g.add(xy("Attention max |logit| per layer", "Max over heads of |q.k/sqrt(d)| over every query row, before soft-capping.",
             [per_layer("attn.logit_max", "value_max")], alerts_on("attn.logit_max"),
             split=True), 8, 9)  # fmt: skip
    g.add(xy("Attention entropy (min per layer)", "Entropy collapse: one key takes all the attention.",
             [per_layer("attn.entropy_min", "value_min", reduce="min")],
             alerts_on("attn.entropy_min", "attn.entropy_mean", "attn.entropy_frac"),
             split=True), 8, 9)  # fmt: skip
    g.add(xy("q and k norms per layer", "RMS of queries and keys fed to the dot product.",
             [per_layer("attn.q_norm", prefix="q layer "), per_layer("attn.k_norm", prefix="k layer ")],
             alerts_on("attn.q_norm", "attn.k_norm"), split=True), 8, 9)  # fmt: skip

    g.row("Optimisation")
    g.add(xy("Gradient norm", "Before clipping: global and per layer.",
             [per_layer("grad.norm", "value_max")], alerts_on("grad.norm"),
             split=True, log=True), 8, 8)  # fmt: skip
    g.add(xy("Update ratio", "||w_t - w_(t-1)|| / ||w_(t-1)||: global and per layer.",
             [per_layer("update.ratio", "value_max")], alerts_on("update.ratio"),
             split=True, log=True), 8, 8)  # fmt: skip
    g.add(xy("Residual RMS per layer", "Residual-stream RMS after each block.",
             [per_layer("act.rms", "value_max")], alerts_on("act.rms"), split=True), 8, 8)  # fmt: skip

    g.row("Alerts and run")
    g.add(table("Alerts", "Every alert of the run at the step it fired; click it to zoom there.",
                [sql("A", ALERTS_SQL)], links={"fired_step": ("Zoom to this step", ZOOM_LINK)}), 24, 7)  # fmt: skip
    g.add(timeseries("Progress over wall time (alerts as annotations)",
                     "Training step against wall time: stalls and restarts show here, with alerts "
                     "at the time they fired.", [sql("A", PROGRESS_SQL, "time_series")], "none"), 12, 7)  # fmt: skip
    g.add(table("Run configuration", "The hyperparameters the run reported.",
                [sql("A", CONFIG_SQL)], links={}), 12, 7)  # fmt: skip

    annotation = {"name": "Alerts", "datasource": ds(POSTGRES), "enable": True, "hide": False,
                  "iconColor": "red", "target": sql("Anno", ANNOTATION_SQL)}  # fmt: skip
    return dashboard(
        uid=RUN_UID,
        title="logitwatch: run deep-dive",
        description="One run against the training step: loss, LR, log Z, logits, attention, gradients, alerts.",
        tags=["logitwatch"],
        panels=g.panels,
        variables=variables(),
        annotations=[annotation],
        time_from="now-7d",
        links=[dashboard_link("Fleet overview", FLEET_UID, f"/d/{FLEET_UID}/fleet-overview")],
    )
