"""Migrations 0003_views and 0006: logitwatch_points() and logitwatch_alerts on PostgreSQL, none on SQLite."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from helpers.pg import fresh_database
from sqlalchemy import inspect, text

from logitwatch.protocol import Batch, series_from_columns
from logitwatch.service.store import ingest_batch
from logitwatch.service.store.db import make_engine, make_sessionmaker, upgrade


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database("lwtest_views") as url:
        yield url


def ingest(url: str, run: str, segment: int, seq: int, series: list) -> None:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            ingest_batch(session, run=run, batch=Batch("c", seq, segment, series))
    finally:
        engine.dispose()


def query(url: str, sql: str) -> list[tuple]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def test_points_unnest_newest_segment_and_keep_spikes_and_nan(pg_url):
    upgrade(pg_url)
    steps = list(range(10))
    loss = [float(s) for s in steps]
    loss[6] = math.nan
    ingest(
        pg_url,
        "r",
        0,
        1,
        [
            series_from_columns("loss", {}, steps, loss, [1e9 + s for s in steps]),
            series_from_columns("attn.logit_max", {"layer": 0, "head": 0}, steps, [1.0] * 10),
            series_from_columns("attn.logit_max", {"layer": 0, "head": 1}, steps, [2.0] * 10),
            series_from_columns("attn.logit_max", {"layer": 1, "head": 0}, steps, [3.0] * 10),
        ],
    )
    # A resume from step 8 opens segment 1: its values replace segment 0's from there on.
    ingest(pg_url, "r", 1, 2, [series_from_columns("loss", {}, [8, 9, 10], [80.0, 90.0, 100.0])])

    rows = query(pg_url, "SELECT step, value FROM logitwatch_points('r', 'loss') ORDER BY step")
    assert [s for s, _ in rows] == list(range(11))
    assert [v for s, v in rows if s >= 8] == [80.0, 90.0, 100.0]
    assert math.isnan(dict(rows)[6])

    # Three buckets of 4 steps: min, max (NaN sorts above numbers) and last per bucket.
    rows = query(
        pg_url,
        "SELECT step, value, value_min, value_max, n "
        "FROM logitwatch_points('r', 'loss', '', '', 3)",
    )
    assert [r[0] for r in rows] == [0, 4, 8]
    assert rows[0][1:] == (3.0, 0.0, 3.0, 4)
    assert math.isnan(rows[1][3]) and rows[1][2] == 4.0
    assert rows[2][1:] == (100.0, 80.0, 100.0, 3)

    rows = query(pg_url, "SELECT step FROM logitwatch_points('r', 'loss', '3', '5')")
    assert [r[0] for r in rows] == [3, 4, 5]

    rows = query(
        pg_url,
        "SELECT layer, max(value_max) FROM logitwatch_points('r', 'attn.logit_max') "
        "GROUP BY layer ORDER BY layer",
    )
    assert rows == [(0, 2.0), (1, 3.0)]
    assert query(pg_url, "SELECT count(*) FROM logitwatch_points('nope', 'loss')") == [(0,)]


def test_alerts_view_names_the_run_layer_and_the_value_where_the_alert_began(pg_url):
    upgrade(pg_url)
    ingest(pg_url, "r", 0, 1, [
        series_from_columns("attn.logit_max", {"layer": 2, "head": 1}, range(6), [1, 2, 30, 40, 50, 60]),
    ])  # fmt: skip
    engine = make_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO alerts (run_id, rule, severity, metric, labels, labels_key, state, segment,"
                " first_step, last_step, value, threshold, hint, created_at, updated_at)"
                " SELECT id, 'attn-logit-growth', 'warning', 'attn.logit_max',"
                " '{\"layer\": \"2\", \"head\": \"1\"}', 'head=1,layer=2', 'firing', 0, 2, 5, 60, 25,"
                " 'enable QK-norm', now(), now() FROM runs WHERE name = 'r'"
            ))  # fmt: skip
    finally:
        engine.dispose()
    rows = query(pg_url, "SELECT run, layer, step, step_value, value FROM logitwatch_alerts")
    assert rows == [("r", 2, 2, 30.0, 60.0)]
    # fired_step (0006): NULL on a row that never recorded it; the value where it fired
    assert query(pg_url, "SELECT fired_step, fired_value FROM logitwatch_alerts") == [(None, None)]
    with make_engine(pg_url).begin() as conn:
        conn.execute(text("UPDATE alerts SET fired_step = 4, fired_at = now()"))
    assert query(pg_url, "SELECT fired_step, fired_value FROM logitwatch_alerts") == [(4, 50.0)]


def test_sqlite_gets_no_views(tmp_path):
    url = f"sqlite:///{tmp_path / 'lw.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        assert "logitwatch_alerts" not in inspect(engine).get_view_names()
        assert "runs" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_deep_dive_marks_and_lists_alerts_at_the_step_they_fired(pg_url):
    """The deep-dive's own alert queries (markers, table, annotations), as Grafana sends them."""
    import json
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    from grafana_queries import Variable, replace, sql_macros, sql_variable

    upgrade(pg_url)
    ingest(pg_url, "r", 0, 1, [
        series_from_columns("attn.logit_max", {"layer": 2, "head": 1}, range(6), [1, 2, 130, 140, 150, 160]),
    ])  # fmt: skip
    with make_engine(pg_url).begin() as conn:
        conn.execute(text(
            "INSERT INTO alerts (run_id, rule, severity, metric, labels, labels_key, state, segment,"
            " first_step, last_step, value, threshold, hint, created_at, updated_at, fired_at,"
            " fired_step) SELECT id, 'attn-logit-high', 'warning', 'attn.logit_max',"
            " '{\"layer\": \"2\", \"head\": \"1\"}', 'head=1,layer=2', 'firing', 0, 2, 5, 160, 100,"
            " 'enable QK-norm', now(), now(), now(), 3 FROM runs WHERE name = 'r'"
        ))  # fmt: skip
    board = json.loads((Path(__file__).parents[2] / "dashboards/run-deep-dive.json").read_text())
    variables = {n: Variable(n, v) for n, v in (("run", "r"), ("step_min", ""), ("step_max", ""))}
    now = datetime.now(UTC)

    def run(sql: str) -> list[tuple]:
        sql = sql_macros(replace(sql, variables, sql_variable), now - timedelta(hours=1),
                         now + timedelta(hours=1), 1000)  # fmt: skip
        return query(pg_url, sql)

    targets = [t for p in board["panels"] for t in p.get("targets", []) if "rawSql" in t]
    markers = [
        t["rawSql"] for t in targets if "attn.logit_max" in t["rawSql"] and '"alert"' in t["rawSql"]
    ]
    assert markers and all(run(m) == [(3, 140.0)] for m in markers)  # fired at 3, not began at 2
    (table,) = [t["rawSql"] for t in targets if "zoom_from" in t["rawSql"]]
    (row,) = run(table)
    assert row[:3] == (3, 2, "attn-logit-high")
    (annotation,) = board["annotations"]["list"][1:]
    ((_, _, note, tags),) = run(annotation["target"]["rawSql"])
    assert "fired at step 3 (from step 2)" in note and tags == "warning,attn-logit-high"
