"""What Grafana does to a panel query before and after the data source runs it, for our dashboards.

Templating follows the frontend's TemplateSrv.replace (its variable regex) with each data
source's interpolateVariable (packages/grafana-sql SqlDatasource.ts; the Prometheus data
source's interpolateQueryExpr); SQL macros follow the PostgreSQL backend (pkg/tsdb/
grafana-postgresql-datasource: sqleng.Interpolate, then macros.go, which rejects unknown
macros); $__interval and $__rate_interval follow Grafana's documented formulas. Only the
transformations our dashboards use are implemented (partitionByValues).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

# TemplateSrv's variable syntax: $var, [[var]] / [[var:fmt]], ${var} / ${var.path} / ${var:fmt}.
_TEMPLATE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\${(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?}"
)
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")  # macros.go's sExpr
_PROM_REGEX_SPECIAL = re.compile(r"([\\^$*+?.()|{}\[\]])")


@dataclass
class Variable:
    name: str
    value: str | list[str]
    multi: bool = False
    include_all: bool = False
    all_value: str | None = None
    is_all: bool = False


def replace(text: str, variables: dict[str, Variable], interpolate) -> str:
    """TemplateSrv.replace: known variables are formatted by the data source; unknown ones stay."""

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        var = variables.get(name)
        if var is None:
            return m.group(0)
        fmt = m.group(3) or m.group(6)
        if fmt:
            raise NotImplementedError(f"format {fmt!r} of ${name} in a query")
        if var.is_all and var.all_value is not None:
            return var.all_value  # Grafana passes a custom all value through unformatted
        return str(interpolate(var.value, var))

    return _TEMPLATE.sub(one, text)


def sql_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sql_variable(value: str | list[str], var: Variable) -> str:
    """SqlDatasource.interpolateVariable."""
    if isinstance(value, list):
        return ",".join(sql_quote(v) for v in value)
    if var.multi or var.include_all:
        return sql_quote(value)
    return value.replace("'", "''")


def prom_variable(value: str | list[str], var: Variable) -> str:
    """The Prometheus data source's interpolateQueryExpr."""
    if not var.multi and not var.include_all:
        assert isinstance(value, str)
        return value.replace("\\", "\\\\").replace("'", "\\\\'")
    values = value if isinstance(value, list) else [value]
    escaped = [_PROM_REGEX_SPECIAL.sub(r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def _rfc3339nano(t: datetime) -> str:
    text = t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def go_duration(ms: int) -> str:
    """gtime.FormatInterval: the largest unit that divides evenly (1h, 5m, 20s, 250ms)."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0 and ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def sql_macros(sql: str, start: datetime, end: datetime, interval_ms: int) -> str:
    """sqleng.Interpolate then the PostgreSQL macro engine, for the macros it defines."""
    sql = sql.replace("$__interval_ms", str(interval_ms)).replace(
        "$__interval", go_duration(interval_ms)
    )
    sql = sql.replace("$__unixEpochFrom()", str(int(start.timestamp())))
    sql = sql.replace("$__unixEpochTo()", str(int(end.timestamp())))

    def macro(m: re.Match) -> str:
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if name == "__time":
            return f'{args[0]} AS "time"'
        if name == "__timeEpoch":
            return f'extract(epoch from {args[0]}) as "time"'
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{_rfc3339nano(start)}' AND '{_rfc3339nano(end)}'"
        if name == "__timeFrom":
            return f"'{_rfc3339nano(start)}'"
        if name == "__timeTo":
            return f"'{_rfc3339nano(end)}'"
        if name == "__unixEpochFilter":
            a = args[0]
            return f"{a} >= {int(start.timestamp())} AND {a} <= {int(end.timestamp())}"
        raise ValueError(f"unknown macro {name!r}")  # as macros.go answers

    return _MACRO.sub(macro, sql)


# Grafana's rangeutil.roundInterval: (upper bound in ms, rounded interval in ms).
_ROUND = [
    (10, 1), (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
    (3500, 2000), (7500, 5000), (12500, 10_000), (17500, 15_000), (25000, 20_000),
    (45000, 30_000), (90000, 60_000), (210_000, 120_000), (450_000, 300_000),
    (750_000, 600_000), (1_050_000, 900_000), (1_500_000, 1_200_000), (2_700_000, 1_800_000),
    (5_400_000, 3_600_000), (9_000_000, 7_200_000), (16_200_000, 10_800_000),
    (32_400_000, 21_600_000), (86_400_000, 43_200_000), (604_800_000, 86_400_000),
    (1_814_400_000, 604_800_000), (3_628_800_000, 2_592_000_000),
]  # fmt: skip


def interval_ms(range_ms: int, max_data_points: int, min_interval_ms: int) -> int:
    """$__interval: range / max data points, rounded, never below the data source's interval."""
    raw = range_ms / max_data_points
    rounded = next((r for bound, r in _ROUND if raw < bound), 31_536_000_000)
    return max(rounded, min_interval_ms)


def rate_interval_ms(interval: int, scrape_ms: int) -> int:
    """$__rate_interval = max($__interval + scrape interval, 4 * scrape interval)."""
    return max(interval + scrape_ms, 4 * scrape_ms)


@dataclass
class Frame:
    """A data frame: named columns with Grafana field types (number, string, time, other)."""

    ref_id: str
    names: list[str]
    types: list[str]
    rows: list[tuple] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    def column(self, name: str) -> list:
        i = self.names.index(name)
        return [r[i] for r in self.rows]


def partition_by_values(frames: list[Frame], options: dict) -> list[Frame]:
    """The partitionByValues transformation: one frame per distinct value (first seen first)."""
    (key,) = options["fields"]
    out = []
    for frame in frames:
        if key not in frame.names:
            out.append(frame)
            continue
        i = frame.names.index(key)
        keep = [j for j in range(len(frame.names)) if j != i or options.get("keepFields")]
        groups: dict[object, list[tuple]] = {}
        for row in frame.rows:
            groups.setdefault(row[i], []).append(tuple(row[j] for j in keep))
        for value, rows in groups.items():
            out.append(
                Frame(
                    frame.ref_id,
                    [frame.names[j] for j in keep],
                    [frame.types[j] for j in keep],
                    rows,
                    {key: str(value)},
                )
            )
    return out


TRANSFORMATIONS = {"partitionByValues": partition_by_values}


def transform(frames: list[Frame], transformations: list[dict]) -> list[Frame]:
    for t in transformations:
        frames = TRANSFORMATIONS[t["id"]](frames, t["options"])
    return frames
