"""The Grafana query expansion used by the live dashboard test, against Grafana's documented examples."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from grafana_queries import (
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

START = datetime(2017, 4, 21, 5, 1, 17, tzinfo=UTC)
END = datetime(2017, 4, 21, 5, 6, 17, tzinfo=UTC)


def test_sql_macros_match_the_postgresql_docs():
    sql = "SELECT 1 WHERE $__timeFilter(created_at) AND t > $__timeFrom() AND t < $__timeTo()"
    assert sql_macros(sql, START, END, 5000) == (
        "SELECT 1 WHERE created_at BETWEEN '2017-04-21T05:01:17Z' AND '2017-04-21T05:06:17Z'"
        " AND t > '2017-04-21T05:01:17Z' AND t < '2017-04-21T05:06:17Z'"
    )
    assert sql_macros("$__unixEpochFilter(ts) $__interval", START, END, 5000) == (
        "ts >= 1492750877 AND ts <= 1492751177 5s"
    )
    with pytest.raises(ValueError, match="unknown macro"):
        sql_macros("SELECT $__nope(x)", START, END, 5000)


def test_sql_variables_are_escaped_and_quoted_as_grafana_does():
    run = Variable("run", "o'brien")
    assert replace("name = '$run' AND x = '${run}'", {"run": run}, sql_variable) == (
        "name = 'o''brien' AND x = 'o''brien'"
    )
    multi = Variable("run", ["a", "b"], multi=True)
    assert replace("name IN ($run)", {"run": multi}, sql_variable) == "name IN ('a','b')"
    # Macros and unknown names are left for the backend.
    assert (
        replace("$__timeFilter(t) $other", {"run": run}, sql_variable) == "$__timeFilter(t) $other"
    )


def test_prometheus_variables_and_intervals():
    every = Variable("run", ["a"], multi=True, include_all=True, all_value=".*", is_all=True)
    assert replace('x{run=~"$run"}', {"run": every}, prom_variable) == 'x{run=~".*"}'
    two = Variable("run", ["a.b", "c"], multi=True, include_all=True)
    assert replace('x{run=~"$run"}', {"run": two}, prom_variable) == 'x{run=~"(a\\\\.b|c)"}'
    assert interval_ms(3_600_000, 1000, 5000) == 5000  # 3.6 s rounds to 5 s
    assert interval_ms(6 * 3_600_000, 1000, 5000) == 20_000  # 21.6 s rounds to 20 s
    assert rate_interval_ms(5000, 5000) == 20_000
    assert rate_interval_ms(60_000, 5000) == 65_000


def test_partition_by_values_splits_frames_and_keeps_others():
    long = Frame(
        "A",
        ["step", "series", "value"],
        ["number", "string", "number"],
        [(0, "layer 0", 1.0), (0, "layer 1", 2.0), (1, "layer 0", 3.0)],
    )
    other = Frame("Z", ["step", "alert"], ["number", "number"], [(1, 9.0)])
    out = transform([long, other], [{"id": "partitionByValues", "options": {"fields": ["series"]}}])
    assert [(f.ref_id, f.labels, f.names, f.rows) for f in out] == [
        ("A", {"series": "layer 0"}, ["step", "value"], [(0, 1.0), (1, 3.0)]),
        ("A", {"series": "layer 1"}, ["step", "value"], [(0, 2.0)]),
        ("Z", {}, ["step", "alert"], [(1, 9.0)]),
    ]
