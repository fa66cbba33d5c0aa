"""Fleet overview (Prometheus): every active run's stability at a glance, and the service's health."""

from __future__ import annotations

from panels import (
    FLEET_UID,
    PROMETHEUS,
    RUN_UID,
    Grid,
    Json,
    dashboard,
    dashboard_link,
    ds,
    ds_variable,
    prom,
    stat,
    table,
    timeseries,
)

RUN = 'run=~"$run"'
RATE = "$__rate_interval"
RUN_LINK = f"/d/{RUN_UID}/run-deep-dive?var-run=${{__value.raw}}&${{__url_time_range}}"
# QK-Clip caps attention logits at 100; Wortsman et al. saw every run past 1e4 diverge.
ATTN_LIMITS = (100.0, 10_000.0)


def runs_table() -> Json:
    columns = {
        "Value #A": "loss",
        "Value #B": "lr",
        "Value #C": "log Z mean",
        "Value #D": "max |attn logit|",
    }
    metrics = ["loss", "lr", "logz_mean", "attn_logit_max"]
    return table(
        "Active runs: latest values",
        "Runs that reported within the service's run_inactive_after_s. Click a run for its deep-dive.",
        [
            prom(ref, f"max by (run) (logitwatch_{m}{{{RUN}}})", instant=True)
            for ref, m in zip("ABCD", metrics, strict=True)
        ],
        links={"run": ("Run deep-dive", RUN_LINK)},
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True}, "renameByName": columns},
            },
        ],
    )


def quantile(ref: str, q: float) -> Json:
    bucket = f"rate(logitwatch_http_request_duration_seconds_bucket[{RATE}])"
    return prom(
        ref,
        f"histogram_quantile({q}, sum by (le, route) ({bucket}))",
        f"p{round(q * 100)} {{{{route}}}}",
    )


def build() -> Json:
    g = Grid()
    g.row("Runs")
    g.add(stat("Active runs", "Runs with a loss reported recently.", [
        prom("A", f"count(count by (run) (logitwatch_loss{{{RUN}}}))", "runs", instant=True),
    ]), 4, 6)  # fmt: skip
    g.add(stat("Firing alerts by severity", "Alerts firing now, summed over runs and rules.", [
        prom("A", f"sum by (severity) (logitwatch_alerts_firing{{{RUN}}})", "{{severity}}", instant=True),
    ]), 6, 6)  # fmt: skip
    g.add(runs_table(), 14, 6)

    g.row("Stability")
    g.add(timeseries("Loss", "Training loss per run.", [
        prom("A", f"logitwatch_loss{{{RUN}}}", "{{run}}"),
    ]), 12, 8)  # fmt: skip
    g.add(timeseries("Learning rate", "Largest learning rate over the optimizer's param groups.", [
        prom("A", f"max by (run) (logitwatch_lr{{{RUN}}})", "{{run}}"),
    ], "sci"), 12, 8)  # fmt: skip
    g.add(timeseries("log Z (mean over tokens)", "Drift away from 0 is what z-loss prevents.", [
        prom("A", f"logitwatch_logz_mean{{{RUN}}}", "{{run}}"),
    ]), 12, 8)  # fmt: skip
    g.add(timeseries(
        "Attention max |logit| per layer", "Max |q.k/sqrt(d)| over heads; lines at 100 (QK-Clip) and 1e4 (divergence).",
        [prom("A", f"logitwatch_attn_logit_max{{{RUN}}}", "{{run}} layer {{layer}}")],
        limits=ATTN_LIMITS,
    ), 12, 8)  # fmt: skip

    g.row("Service")
    g.add(timeseries("Ingest rate", "Points stored per second, all runs.", [
        prom("A", f"sum(rate(logitwatch_points_ingested_total[{RATE}]))", "points/s"),
    ]), 6, 8)  # fmt: skip
    g.add(timeseries("Requests", "Requests per second by route.", [
        prom("A", f"sum by (route) (rate(logitwatch_http_requests_total[{RATE}]))", "{{route}}"),
    ], "reqps"), 6, 8)  # fmt: skip
    g.add(
        timeseries(
            "Request latency",
            "p50 and p99 by route.",
            [quantile("A", 0.5), quantile("B", 0.99)],
            "s",
        ),
        6,
        8,
    )
    g.add(timeseries("Errors", "4xx and 5xx responses per second by status and route.", [
        prom("A", 'sum by (status, route) (rate(logitwatch_http_requests_total{status=~"[45].."}'
             f"[{RATE}]))", "{{status}} {{route}}"),
    ], "reqps"), 6, 8)  # fmt: skip

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
