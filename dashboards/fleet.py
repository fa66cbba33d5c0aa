"""Fleet overview (Prometheus): every active run's stability at a glance, and the service's health."""

from __future__ import annotations

from build import (
    FLEET_UID,
    PROMETHEUS,
    RUN_UID,
    Grid,
    Json,
    dashboard,
    dashboard_link,
    ds,
    ds_variable,
    field_defaults,
    legend,
    thresholds,
    tooltip,
)

RUN = 'run=~"$run"'
RATE = "$__rate_interval"
RUN_LINK = f"/d/{RUN_UID}/run-deep-dive?var-run=${{__value.raw}}&${{__url_time_range}}"


def target(ref: str, expr: str, legend_format: str = "", *, instant: bool = False) -> Json:
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


def graph_custom(*, threshold_lines: bool = False, log: bool = False) -> Json:
    return {
        "drawStyle": "line",
        "lineInterpolation": "linear",
        "lineWidth": 1,
        "fillOpacity": 0,
        "showPoints": "never",
        "spanNulls": False,
        "axisPlacement": "auto",
        "scaleDistribution": {"type": "log", "log": 10} if log else {"type": "linear"},
        "thresholdsStyle": {"mode": "line" if threshold_lines else "off"},
    }


def timeseries(
    title: str, description: str, targets: list[Json], unit: str = "short", **kw: Json
) -> Json:
    defaults = field_defaults(unit, graph_custom(**kw))
    if kw.get("threshold_lines"):
        # QK-Clip caps attention logits at 100; Wortsman et al. saw every run past 1e4 diverge.
        defaults["thresholds"] = thresholds((None, "green"), (100, "orange"), (10_000, "red"))
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": ds(PROMETHEUS),
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": legend("bottom"), "tooltip": tooltip()},
    }


def stat(title: str, description: str, targets: list[Json]) -> Json:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": ds(PROMETHEUS),
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": thresholds((None, "green"), (1, "red")),
                "unit": "none",
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "auto",
            "textMode": "value_and_name",
            "colorMode": "background",
            "graphMode": "none",
            "justifyMode": "auto",
            "wideLayout": True,
            "showPercentChange": False,
            "percentChangeColorMode": "standard",
        },
    }


def runs_table() -> Json:
    columns = {
        "Value #A": "loss",
        "Value #B": "lr",
        "Value #C": "log Z mean",
        "Value #D": "max attn logit",
    }
    return {
        "type": "table",
        "title": "Active runs: latest values",
        "description": "Runs that reported within the service's run_inactive_after_s. Click a run for its deep-dive.",
        "datasource": ds(PROMETHEUS),
        "targets": [
            target("A", f"max by (run) (logitwatch_loss{{{RUN}}})", instant=True),
            target("B", f"max by (run) (logitwatch_lr{{{RUN}}})", instant=True),
            target("C", f"max by (run) (logitwatch_logz_mean{{{RUN}}})", instant=True),
            target("D", f"max by (run) (logitwatch_attn_logit_max{{{RUN}}})", instant=True),
        ],
        "transformations": [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True}, "renameByName": columns},
            },
        ],
        "fieldConfig": {
            "defaults": {
                "custom": {"align": "auto", "cellOptions": {"type": "auto"}, "inspect": False}
            },
            "overrides": [
                {
                    "matcher": {"id": "byName", "options": "run"},
                    "properties": [
                        {"id": "links", "value": [{"title": "Run deep-dive", "url": RUN_LINK}]}
                    ],
                }
            ],
        },
        "options": {
            "showHeader": True,
            "cellHeight": "sm",
            "frameIndex": 0,
        },
    }


def build() -> Json:
    g = Grid()
    g.row("Runs")
    g.add(
        stat(
            "Active runs",
            "Runs with a loss reported recently.",
            [
                target(
                    "A", f"count(count by (run) (logitwatch_loss{{{RUN}}}))", "runs", instant=True
                ),
            ],
        ),
        4,
        6,
    )
    g.add(
        stat(
            "Firing alerts by severity",
            "Alerts firing now, summed over runs and rules.",
            [
                target(
                    "A",
                    f"sum by (severity) (logitwatch_alerts_firing{{{RUN}}})",
                    "{{severity}}",
                    instant=True,
                ),
            ],
        ),
        6,
        6,
    )
    g.add(runs_table(), 14, 6)

    g.row("Stability")
    g.add(
        timeseries(
            "Loss",
            "Training loss per run.",
            [
                target("A", f"logitwatch_loss{{{RUN}}}", "{{run}}"),
            ],
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Learning rate",
            "Largest learning rate over the optimizer's param groups.",
            [
                target("A", f"max by (run) (logitwatch_lr{{{RUN}}})", "{{run}}"),
            ],
            "sci",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "log Z (mean over tokens)",
            "Drift away from 0 is what z-loss prevents.",
            [
                target("A", f"logitwatch_logz_mean{{{RUN}}}", "{{run}}"),
            ],
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Attention max logit per layer",
            "Max over heads; lines at 100 (QK-Clip) and 1e4 (divergence).",
            [
                target("A", f"logitwatch_attn_logit_max{{{RUN}}}", "{{run}} layer {{layer}}"),
            ],
            threshold_lines=True,
        ),
        12,
        8,
    )

    g.row("Service")
    g.add(
        timeseries(
            "Ingest rate",
            "Points stored per second, all runs.",
            [
                target("A", f"sum(rate(logitwatch_points_ingested_total[{RATE}]))", "points/s"),
            ],
            "short",
        ),
        6,
        8,
    )
    g.add(
        timeseries(
            "Requests",
            "Requests per second by route.",
            [
                target(
                    "A",
                    f"sum by (route) (rate(logitwatch_http_requests_total[{RATE}]))",
                    "{{route}}",
                ),
            ],
            "reqps",
        ),
        6,
        8,
    )
    g.add(
        timeseries(
            "Request latency",
            "p50 and p99 by route.",
            [
                target(
                    "A",
                    "histogram_quantile(0.5, sum by (le, route) "
                    f"(rate(logitwatch_http_request_duration_seconds_bucket[{RATE}])))",
                    "p50 {{route}}",
                ),
                target(
                    "B",
                    "histogram_quantile(0.99, sum by (le, route) "
                    f"(rate(logitwatch_http_request_duration_seconds_bucket[{RATE}])))",
                    "p99 {{route}}",
                ),
            ],
            "s",
        ),
        6,
        8,
    )
    g.add(
        timeseries(
            "Errors",
            "4xx and 5xx responses per second by status and route.",
            [
                target(
                    "A",
                    'sum by (status, route) (rate(logitwatch_http_requests_total{status=~"[45].."}'
                    f"[{RATE}]))",
                    "{{status}} {{route}}",
                ),
            ],
            "reqps",
        ),
        6,
        8,
    )

    run_var = {
        "name": "run",
        "label": "Run",
        "type": "query",
        "datasource": ds(PROMETHEUS),
        "query": "label_values(logitwatch_loss, run)",
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"text": "All", "value": "$__all"},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
        "skipUrlSync": False,
    }
    return dashboard(
        uid=FLEET_UID,
        title="logitwatch: fleet overview",
        description="Every active run's loss, LR, log Z and attention logits, firing alerts, and the service's health.",
        tags=["logitwatch"],
        panels=g.panels,
        variables=[ds_variable(PROMETHEUS, "Prometheus"), run_var],
        annotations=[],
        time_from="now-1h",
        links=[dashboard_link("Run deep-dive", RUN_UID, f"/d/{RUN_UID}/run-deep-dive")],
    )
