"""Reports: a batch of one point per series stored as one row (store/reports.py).

Revision ID: 0007_reports
Revises: 0006_alerts_view_fired_step
Create Date: 2026-12-08

A run's newest points may sit in ``reports`` until the compactor turns them into chunks, so
on PostgreSQL logitwatch_points() and the logitwatch_alerts view read them too: a report's
points come after every chunk of their segment (the later write wins a step sent twice).
Downgrading writes each report back as the one-point chunks ingest wrote before.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007_reports"
down_revision = "0006_alerts_view_fired_step"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Steps = sa.LargeBinary().with_variant(postgresql.ARRAY(sa.BigInteger()), "postgresql")
Floats = sa.LargeBinary().with_variant(postgresql.ARRAY(sa.Double()), "postgresql")

#: Added to a report's id where it is ordered with chunk ids: after all of them.
_AFTER_CHUNKS = "4611686018427387904"

POINTS_FUNCTION = f"""
CREATE OR REPLACE FUNCTION logitwatch_points(
    p_run text,
    p_metric text,
    p_step_min text DEFAULT '',
    p_step_max text DEFAULT '',
    p_buckets integer DEFAULT 1000
) RETURNS TABLE (
    step bigint,
    layer integer,
    head integer,
    labels text,
    value double precision,
    value_min double precision,
    value_max double precision,
    n bigint,
    "time" timestamptz
) LANGUAGE sql STABLE AS $fn$
WITH bounds AS (
    SELECT NULLIF(btrim(p_step_min), '')::bigint AS lo,
           NULLIF(btrim(p_step_max), '')::bigint AS hi
), raw AS (
    SELECT s.id AS sid, s.layer AS s_layer, s.head AS s_head, s.labels_key AS s_labels,
           c.segment AS seg, c.id AS ord, p.st, p.v, p.t
    FROM runs r
    JOIN series s ON s.run_id = r.id
    JOIN chunks c ON c.series_id = s.id
    CROSS JOIN bounds b
    CROSS JOIN LATERAL unnest(c.steps, c."values", c.times) AS p(st, v, t)
    WHERE r.name = p_run AND s.metric = p_metric
      AND (b.lo IS NULL OR (c.step_max >= b.lo AND p.st >= b.lo))
      AND (b.hi IS NULL OR (c.step_min <= b.hi AND p.st <= b.hi))
    UNION ALL
    SELECT s.id, s.layer, s.head, s.labels_key, rp.segment, {_AFTER_CHUNKS} + rp.id, p.st, p.v, p.t
    FROM runs r
    JOIN reports rp ON rp.run_id = r.id
    CROSS JOIN bounds b
    CROSS JOIN LATERAL unnest(rp.series_ids, rp.steps, rp."values", rp.times) AS p(sid, st, v, t)
    JOIN series s ON s.id = p.sid
    WHERE r.name = p_run AND s.metric = p_metric
      AND (b.lo IS NULL OR (rp.step_max >= b.lo AND p.st >= b.lo))
      AND (b.hi IS NULL OR (rp.step_min <= b.hi AND p.st <= b.hi))
), pts AS (
    SELECT DISTINCT ON (sid, st) sid, s_layer, s_head, s_labels, st, v, t
    FROM raw
    ORDER BY sid, st, seg DESC, ord DESC
), grid AS (
    SELECT min(st) AS s0,
           GREATEST(1, ceil((max(st) - min(st) + 1)::numeric / GREATEST(p_buckets, 1)))::bigint AS w
    FROM pts
)
SELECT g.s0 + ((pts.st - g.s0) / g.w) * g.w,
       min(pts.s_layer), min(pts.s_head), min(pts.s_labels),
       (array_agg(pts.v ORDER BY pts.st DESC))[1],
       min(pts.v), max(pts.v), count(*),
       to_timestamp(max(pts.t))
FROM pts CROSS JOIN grid g
GROUP BY pts.sid, g.s0 + ((pts.st - g.s0) / g.w) * g.w
ORDER BY 1, 2 NULLS FIRST, 3 NULLS FIRST
$fn$;
"""


def _value_at(step: str, alias: str) -> str:
    """A LATERAL join: the alert's series value at ``step`` (newest segment, then the later
    write, first), from its chunks and its run's reports."""
    return f"""LEFT JOIN LATERAL (
    SELECT x.v FROM (
        SELECT c.segment AS seg, c.id AS ord, p.v
        FROM series s
        JOIN chunks c ON c.series_id = s.id
        CROSS JOIN LATERAL unnest(c.steps, c."values") AS p(st, v)
        WHERE s.run_id = a.run_id AND s.metric = a.metric AND s.labels_key = a.labels_key
          AND c.segment <= a.segment AND c.step_min <= {step} AND c.step_max >= {step}
          AND p.st = {step}
        UNION ALL
        SELECT rp.segment, {_AFTER_CHUNKS} + rp.id, p.v
        FROM series s
        JOIN reports rp ON rp.run_id = s.run_id
        CROSS JOIN LATERAL unnest(rp.series_ids, rp.steps, rp."values") AS p(sid, st, v)
        WHERE s.run_id = a.run_id AND s.metric = a.metric AND s.labels_key = a.labels_key
          AND rp.segment <= a.segment AND rp.step_min <= {step} AND rp.step_max >= {step}
          AND p.sid = s.id AND p.st = {step}
    ) x
    ORDER BY x.seg DESC, x.ord DESC
    LIMIT 1
) {alias} ON true"""


ALERTS_VIEW = f"""
CREATE OR REPLACE VIEW logitwatch_alerts AS
SELECT a.id, r.name AS run, a.rule, a.severity, a.state, a.metric, a.labels_key AS labels,
       CASE WHEN a.labels->>'layer' ~ '^[0-9]+$' THEN (a.labels->>'layer')::integer END AS layer,
       a.segment, a.first_step AS step, fv.v AS step_value, a.last_step, a.value, a.threshold,
       a.hint, a.created_at, a.fired_at, a.resolved_at, a.resolved_step, a.acked_at,
       a.fired_step, fired.v AS fired_value
FROM alerts a
JOIN runs r ON r.id = a.run_id
{_value_at("a.first_step", "fv")}
{_value_at("a.fired_step", "fired")};
"""


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    op.create_table(
        "reports",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("run_id", BigId, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("segment", sa.Integer, nullable=False),
        sa.Column("step_min", sa.BigInteger, nullable=False),
        sa.Column("step_max", sa.BigInteger, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("series_ids", Steps, nullable=False),
        sa.Column("steps", Steps, nullable=False),
        sa.Column("values", Floats, nullable=False),
        sa.Column("times", Floats, nullable=False),
    )
    op.create_index("ix_reports_run", "reports", ["run_id", "segment"])
    if _postgres():
        op.execute(POINTS_FUNCTION)
        op.execute(ALERTS_VIEW)


# Each report's points as the one-point chunks ingest wrote before this revision, oldest first.
_PG_TO_CHUNKS = """
INSERT INTO chunks (series_id, segment, step_min, step_max, n, steps, "values", times)
SELECT p.sid, rp.segment, p.st, p.st, 1, ARRAY[p.st], ARRAY[p.v],
       CASE WHEN cardinality(rp.times) = 0 THEN '{}'::float8[] ELSE ARRAY[p.t] END
FROM reports rp
CROSS JOIN LATERAL unnest(rp.series_ids, rp.steps, rp."values", rp.times)
    WITH ORDINALITY AS p(sid, st, v, t, k)
ORDER BY rp.id, p.k
"""


def _sqlite_to_chunks() -> None:
    bind = op.get_bind()
    rows = bind.exec_driver_sql(
        'SELECT segment, series_ids, steps, "values", times FROM reports ORDER BY id'
    ).fetchall()
    chunks = []
    for seg, sids, steps, values, times in rows:
        n = len(sids) // 8
        for k in range(n):
            # A later version stores a step or time all the series share once, and values
            # that are all float32 numbers in 4 bytes each (reports._arrays).
            (sid,) = struct.unpack_from("<q", sids, 8 * k)
            (step,) = struct.unpack_from("<q", steps, 0 if len(steps) == 8 else 8 * k)
            if len(values) == 4 * n:
                value = struct.pack("<d", struct.unpack_from("<f", values, 4 * k)[0])
            else:
                value = values[8 * k : 8 * k + 8]
            at = 0 if len(times) == 8 else 8 * k
            t = b"R" + times[at : at + 8] if times else b""
            chunks.append((sid, seg, step, step, 1, b"", b"R" + value, t))
    if chunks:
        bind.exec_driver_sql(
            'INSERT INTO chunks (series_id, segment, step_min, step_max, n, steps, "values", times)'
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            chunks,
        )


def _sibling(name: str):
    """Another revision's module (Alembic loads these files by path, not as a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def downgrade() -> None:
    if _postgres():
        op.execute(_PG_TO_CHUNKS)
        op.execute(_sibling("0003_views").POINTS_FUNCTION)
        op.execute(_sibling("0006_alerts_view_fired_step")._view(fired=True))
    else:
        _sqlite_to_chunks()
    op.drop_index("ix_reports_run", table_name="reports")
    op.drop_table("reports")
