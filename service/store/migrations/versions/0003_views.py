"""Grafana helpers on PostgreSQL: logitwatch_points() unnests chunks, logitwatch_alerts names runs.

Revision ID: 0003_views
Revises: 0002_rules
Create Date: 2026-11-29

The run deep-dive dashboard's SQL stays one line per panel because of these:
``SELECT step, value_max AS loss FROM logitwatch_points('$run', 'loss', '$step_min', '$step_max')``.
SQLite has no arrays and no Grafana data source, so there the migration does nothing.
"""

from __future__ import annotations

from alembic import op

revision = "0003_views"
down_revision = "0002_rules"
branch_labels = None
depends_on = None

# Step bounds are text so that Grafana's empty textbox variables ('') mean "no bound".
# Per (series, step) only the newest segment counts, as in the REST reads. Past p_buckets
# distinct steps, points fall into equal step buckets on one grid shared by all series of
# the metric (so a max over heads stays aligned); each bucket keeps its min and max
# (PostgreSQL orders NaN above every number, so value_max never hides a NaN) and its last value.
POINTS_FUNCTION = """
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
), pts AS (
    SELECT DISTINCT ON (s.id, p.st)
           s.id AS sid, s.layer AS s_layer, s.head AS s_head, s.labels_key AS s_labels,
           p.st, p.v, p.t
    FROM runs r
    JOIN series s ON s.run_id = r.id
    JOIN chunks c ON c.series_id = s.id
    CROSS JOIN bounds b
    CROSS JOIN LATERAL unnest(c.steps, c."values", c.times) AS p(st, v, t)
    WHERE r.name = p_run AND s.metric = p_metric
      AND (b.lo IS NULL OR (c.step_max >= b.lo AND p.st >= b.lo))
      AND (b.hi IS NULL OR (c.step_min <= b.hi AND p.st <= b.hi))
    ORDER BY s.id, p.st, c.segment DESC
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

# Alerts with their run's name and layer as columns; `step` is where the alert began and
# `step_value` its series' value there (the point a chart marks; `value` is the latest one).
ALERTS_VIEW = """
CREATE OR REPLACE VIEW logitwatch_alerts AS
SELECT a.id, r.name AS run, a.rule, a.severity, a.state, a.metric, a.labels_key AS labels,
       CASE WHEN a.labels->>'layer' ~ '^[0-9]+$' THEN (a.labels->>'layer')::integer END AS layer,
       a.segment, a.first_step AS step, fv.v AS step_value, a.last_step, a.value, a.threshold,
       a.hint, a.created_at, a.fired_at, a.resolved_at, a.resolved_step, a.acked_at
FROM alerts a
JOIN runs r ON r.id = a.run_id
LEFT JOIN LATERAL (
    SELECT p.v
    FROM series s
    JOIN chunks c ON c.series_id = s.id
    CROSS JOIN LATERAL unnest(c.steps, c."values") AS p(st, v)
    WHERE s.run_id = a.run_id AND s.metric = a.metric AND s.labels_key = a.labels_key
      AND c.segment <= a.segment AND c.step_min <= a.first_step AND c.step_max >= a.first_step
      AND p.st = a.first_step
    ORDER BY c.segment DESC
    LIMIT 1
) fv ON true;
"""


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if not _postgres():
        return
    op.execute(POINTS_FUNCTION)
    op.execute(ALERTS_VIEW)


def downgrade() -> None:
    if not _postgres():
        return
    op.execute("DROP VIEW IF EXISTS logitwatch_alerts")
    op.execute("DROP FUNCTION IF EXISTS logitwatch_points(text, text, text, text, integer)")
