"""The logitwatch_alerts view (PostgreSQL) also gives the step each alert fired at and its
series' value there, so that dashboards mark alerts where they went firing.

Revision ID: 0006_alerts_view_fired_step
Revises: 0005_chunk_summaries
Create Date: 2026-12-06

``fired_step`` is NULL while an alert is pending (and on rows from before 0004); CREATE OR
REPLACE VIEW may only add columns at the end, so the two new ones come last.
"""

from __future__ import annotations

from alembic import op

revision = "0006_alerts_view_fired_step"
down_revision = "0005_chunk_summaries"
branch_labels = None
depends_on = None


def _value_at(step: str, alias: str) -> str:
    """A LATERAL join: the alert's series value at ``step`` (newest segment first)."""
    return f"""LEFT JOIN LATERAL (
    SELECT p.v
    FROM series s
    JOIN chunks c ON c.series_id = s.id
    CROSS JOIN LATERAL unnest(c.steps, c."values") AS p(st, v)
    WHERE s.run_id = a.run_id AND s.metric = a.metric AND s.labels_key = a.labels_key
      AND c.segment <= a.segment AND c.step_min <= {step} AND c.step_max >= {step}
      AND p.st = {step}
    ORDER BY c.segment DESC
    LIMIT 1
) {alias} ON true"""


def _view(fired: bool) -> str:
    extra = ", a.fired_step, fired.v AS fired_value" if fired else ""
    join = "\n" + _value_at("a.fired_step", "fired") if fired else ""
    return f"""
CREATE OR REPLACE VIEW logitwatch_alerts AS
SELECT a.id, r.name AS run, a.rule, a.severity, a.state, a.metric, a.labels_key AS labels,
       CASE WHEN a.labels->>'layer' ~ '^[0-9]+$' THEN (a.labels->>'layer')::integer END AS layer,
       a.segment, a.first_step AS step, fv.v AS step_value, a.last_step, a.value, a.threshold,
       a.hint, a.created_at, a.fired_at, a.resolved_at, a.resolved_step, a.acked_at{extra}
FROM alerts a
JOIN runs r ON r.id = a.run_id
{_value_at("a.first_step", "fv")}{join};
"""


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgres():
        op.execute(_view(fired=True))


def downgrade() -> None:
    if _postgres():  # a view cannot lose columns in place: drop it and make 0003's again
        op.execute("DROP VIEW IF EXISTS logitwatch_alerts")
        op.execute(_view(fired=False))
