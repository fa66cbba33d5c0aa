"""Every dashboard query, run for real: the service on a fresh PostgreSQL database, two short
training runs of the reference decoder streamed into it by `logitwatch train` (one healthy,
one without QK-norm at a high LR, which fires alerts), Debian's prometheus scraping it with
the repository's dashboards/prometheus.yml (only the target rewritten). Each Prometheus panel
query goes through Prometheus's HTTP API and each SQL query through PostgreSQL as Grafana's
read-only role, expanded as Grafana expands them; each must return data in its panel's shape.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml
from helpers.pg import PG_ADMIN, fresh_database
from helpers.prometheus import prom_get, prometheus
from helpers.server import live_server
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "dashboards"))
from grafana_queries import (  # noqa: E402
    Frame,
    Variable,
    interval_ms,
    prom_variable,
    rate_interval_ms,
    replace,
    sql_macros,
    sql_variable,
    transform,
)

RUNS = {"healthy": [], "unstable": ["--no-qk-norm", "--lr", "0.1"]}
TRAIN = ["--preset", "llama2", "--steps", "24", "--batch-size", "4", "--seq-len", "32",
         "--warmup", "4", "--every", "2", "--corpus-bytes", "100000", "--no-progress"]  # fmt: skip
MAX_DATA_POINTS = 1000  # what a ~1000 px wide panel asks for
NUMBER = {"int2", "int4", "int8", "float4", "float8", "numeric"}


def board(name: str) -> dict:
    return json.loads((REPO / "dashboards" / name).read_text())


def panels(b: dict) -> list[dict]:
    return [p for p in b["panels"] if p["type"] != "row"]


@contextlib.contextmanager
def grafana_reader(db_url: str) -> Iterator[str]:
    """Grafana's role, made by the same script compose runs in the PostgreSQL container."""
    url = make_url(db_url)
    role = f"lw_reader_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PGHOST": url.host, "POSTGRES_USER": "postgres", "POSTGRES_DB": url.database,
           "GRAFANA_DB_USER": role, "GRAFANA_DB_PASSWORD": uuid.uuid4().hex}  # fmt: skip
    subprocess.run(["sh", str(REPO / "dashboards/postgres/grafana-reader.sh")], env=env,
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield f"host={url.host} port={url.port} dbname={url.database} user={role}"
    finally:
        with psycopg.connect(f"{PG_ADMIN.replace('dbname=postgres', f'dbname={url.database}')}",
                             autocommit=True) as conn:  # fmt: skip
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')


def prometheus_config(service_port: int) -> dict:
    """The repository's dashboards/prometheus.yml, scraping the service under test."""
    config = yaml.safe_load((REPO / "dashboards/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    return config


def wait_for_scrapes(prom: str, n: int, timeout: float = 60) -> None:
    """Until n scrapes of the service have landed since now (each one sample of `up`)."""
    deadline = time.monotonic() + timeout
    first = None
    while time.monotonic() < deadline:
        data = prom_get(prom, "query", query='count_over_time(up{job="logitwatch"}[10m])')
        seen = int(float(data["result"][0]["value"][1])) if data["result"] else 0
        first = seen if first is None else first
        if seen - first >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"prometheus did not scrape the service {n} times")


def train(url: str, tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        run: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "logitwatch",
                "train",
                *TRAIN,
                *extra,
                "--server",
                url,
                "--run",
                run,
                "--spool",
                str(tmp / f"spool-{run}"),
                "--save-dir",
                str(tmp / f"ckpt-{run}"),
            ],
            stdout=(tmp / f"{run}.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        for run, extra in RUNS.items()
    }
    for run, proc in procs.items():
        assert proc.wait(timeout=300) == 0, (tmp / f"{run}.log").read_text()[-3000:]


# --- Prometheus panels -------------------------------------------------------------------


def check_prometheus_board(prom: str, now: datetime) -> None:
    b = board("fleet-overview.json")
    start = now - timedelta(hours=1)  # the dashboard's default range, now-1h
    config = yaml.safe_load((REPO / "dashboards/prometheus.yml").read_text())
    scrape = int(config["global"]["scrape_interval"].removesuffix("s")) * 1000
    interval = interval_ms(int((now - start).total_seconds() * 1000), MAX_DATA_POINTS, scrape)
    rate = rate_interval_ms(interval, scrape)
    run_var = next(v for v in b["templating"]["list"] if v["name"] == "run")
    runs = prom_get(prom, "label/run/values", **{"match[]": "logitwatch_loss"})
    assert run_var["query"] == "label_values(logitwatch_loss, run)" and set(runs) == set(RUNS)
    variables = {  # the run variable at its default, All
        "run": Variable("run", runs, True, True, run_var["allValue"], is_all=True),
        "__interval": Variable("__interval", f"{interval // 1000}s"),
        "__rate_interval": Variable("__rate_interval", f"{rate // 1000}s"),
    }
    for panel in panels(b):
        results = []
        for t in panel["targets"]:
            expr = replace(t["expr"], variables, prom_variable)
            if t["instant"]:
                data = prom_get(prom, "query", query=expr, time=now.timestamp())
                assert data["resultType"] == "vector" and data["result"], (panel["title"], expr)
            else:
                data = prom_get(prom, "query_range", query=expr, start=start.timestamp(),
                                end=now.timestamp(), step=interval / 1000)  # fmt: skip
                assert data["resultType"] == "matrix" and data["result"], (panel["title"], expr)
                # A route without traffic in a window has no quantile (NaN); some series must have.
                values = [float(v) for s in data["result"] for _, v in s["values"]]
                assert any(not math.isnan(v) for v in values), (panel["title"], expr)
                if "points_ingested" in expr:  # thousands of points went in
                    assert max(values) > 0, f"{panel['title']}: {expr} stayed 0"
            for label in re.findall(r"\{\{(\w+)\}\}", t["legendFormat"]):
                assert all(label in s["metric"] for s in data["result"]), (panel["title"], label)
            results.append(data["result"])
        if panel["type"] == "table":  # merged on `run`: every query must name the same runs
            run_sets = [{s["metric"]["run"] for s in r} for r in results]
            assert all(rs == set(RUNS) for rs in run_sets), (panel["title"], run_sets)


# --- PostgreSQL panels -------------------------------------------------------------------


def run_sql(conn: psycopg.Connection, ref: str, sql: str) -> Frame:
    with conn.cursor() as cur:
        cur.execute(sql)
        names = [d.name for d in cur.description]
        types = []
        for d in cur.description:
            info = conn.adapters.types.get(d.type_code)
            pg = info.name if info else "unknown"
            types.append("number" if pg in NUMBER else "time" if pg.startswith("timestamp") else
                         "string" if pg in ("text", "varchar", "name") else pg)  # fmt: skip
        return Frame(ref, names, types, cur.fetchall())


def expand_sql(sql: str, variables: dict[str, Variable], start: datetime, end: datetime) -> str:
    return sql_macros(replace(sql, variables, sql_variable), start, end, 60_000)


def check_xy(panel: dict, frames: list[Frame]) -> int:
    """Each line frame: numeric `step` (x, ascending) and a numeric y; marker frames may be empty."""
    markers = 0
    for f in transform(frames, panel["transformations"]):
        assert "step" in f.names and f.types[f.names.index("step")] == "number", (
            panel["title"],
            f.names,
        )
        ys = [n for n, t in zip(f.names, f.types, strict=True) if t == "number" and n != "step"]
        assert ys, (panel["title"], f.names, f.types)
        if f.ref_id == "Z":
            markers += len(f.rows)
            continue
        steps = f.column("step")
        assert len(steps) >= 2 and steps == sorted(steps), (panel["title"], f.labels, steps)
    return markers


def check_postgres_board(reader: str, now: datetime) -> None:
    b = board("run-deep-dive.json")
    start, end = now - timedelta(days=7), now  # the dashboard's default range, now-7d
    tpl = {v["name"]: v for v in b["templating"]["list"]}
    with psycopg.connect(reader, autocommit=True) as conn:
        runs = run_sql(conn, "run", expand_sql(tpl["run"]["query"], {}, start, end))
        assert runs.names == ["name"] and {r[0] for r in runs.rows} == set(RUNS)
        for run in RUNS:
            variables = {"run": Variable("run", run), "step_min": Variable("step_min", ""),
                         "step_max": Variable("step_max", "")}  # fmt: skip
            markers = alert_rows = 0
            for panel in panels(b):
                frames = [run_sql(conn, t["refId"], expand_sql(t["rawSql"], variables, start, end))
                          for t in panel["targets"]]  # fmt: skip
                if panel["type"] == "xychart":
                    markers += check_xy(panel, frames)
                elif panel["type"] == "timeseries":  # time_series format needs a time column
                    (f,) = frames
                    assert f.types[f.names.index("time")] == "time" and "number" in f.types, f.types
                    assert f.rows, (run, panel["title"])
                else:
                    (f,) = frames
                    if panel["title"] == "Alerts":
                        alert_rows += len(f.rows)
                        assert {"zoom_from", "zoom_to", "fired_step", "first_step"} <= set(f.names)
                    else:
                        assert f.rows, (run, panel["title"])
            (anno,) = [a for a in b["annotations"]["list"] if "target" in a]
            f = run_sql(conn, "Anno", expand_sql(anno["target"]["rawSql"], variables, start, end))
            assert f.names[:2] == ["time", "timeend"] and {"text", "tags"} <= set(f.names)
            if run == "unstable":  # its alerts: in the table, as markers, and as annotations
                assert alert_rows and markers and f.rows, (alert_rows, markers, len(f.rows))
        # The step window a zoom link sets narrows every chart to it.
        variables = {"run": Variable("run", "unstable"), "step_min": Variable("step_min", "10"),
                     "step_max": Variable("step_max", "20")}  # fmt: skip
        loss = next(p for p in panels(b) if p["title"] == "Loss and z-loss")
        f = run_sql(conn, "A", expand_sql(loss["targets"][0]["rawSql"], variables, start, end))
        assert f.rows and all(10 <= s <= 20 for s in f.column("step"))


def test_every_dashboard_query_returns_data_in_its_panels_shape(tmp_path):
    if not shutil.which("prometheus"):
        pytest.fail("Debian's prometheus is not installed: run scripts/setup.sh")
    with (
        fresh_database("lwtest_dash") as db_url,
        live_server(db_url) as server,
        grafana_reader(db_url) as reader,
        prometheus(prometheus_config(server.port), tmp_path) as prometheus_process,
    ):
        prom = prometheus_process.url
        # Scrapes before training: on a fast machine the runs finish within one scrape
        # interval, and a counter seen only after its rise has no rate.
        wait_for_scrapes(prom, 2)
        train(server.url, tmp_path)
        with server.client() as client:  # a user's mistakes, for the Errors panel
            assert client.get("/api/v1/runs/no-such-run").status_code == 404
            assert client.post("/api/v1/runs/healthy/points", content=b"{").status_code in (
                400,
                422,
            )
        wait_for_scrapes(prom, 3)
        now = datetime.now(UTC)
        check_postgres_board(reader, now)
        check_prometheus_board(prom, now)
