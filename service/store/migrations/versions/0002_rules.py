"""Rule engine: alerts, rule_state, silences, deliveries, user_rules.

Revision ID: 0002_rules
Revises: 0001_initial
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002_rules"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Stamp = sa.DateTime(timezone=True)
OPEN_WHERE = sa.text("state <> 'resolved'")


def _run_fk() -> sa.Column:
    return sa.Column("run_id", BigId, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", BigId, primary_key=True),
        _run_fk(),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("metric", sa.String(128), nullable=False),
        sa.Column("labels", Json, nullable=False),
        sa.Column("labels_key", sa.String(1200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("segment", sa.Integer, nullable=False),
        sa.Column("first_step", sa.BigInteger, nullable=False),
        sa.Column("last_step", sa.BigInteger, nullable=False),
        sa.Column("value", sa.Double, nullable=True),
        sa.Column("threshold", sa.Double, nullable=True),
        sa.Column("hint", sa.Text, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.Column("fired_at", Stamp, nullable=True),
        sa.Column("resolved_at", Stamp, nullable=True),
        sa.Column("resolved_step", sa.BigInteger, nullable=True),
        sa.Column("acked_at", Stamp, nullable=True),
        sa.Column("acked_by", sa.String(128), nullable=True),
    )
    op.create_index(
        "uq_alerts_open",
        "alerts",
        ["run_id", "rule", "metric", "labels_key"],
        unique=True,
        sqlite_where=OPEN_WHERE,
        postgresql_where=OPEN_WHERE,
    )
    op.create_index("ix_alerts_state", "alerts", ["state", "run_id"])
    op.create_table(
        "rule_state",
        _run_fk(),
        sa.Column("series_key", sa.String(1400), nullable=False),
        sa.Column("segment", sa.Integer, nullable=False),
        sa.Column("last_step", sa.BigInteger, nullable=False),
        sa.Column("state", Json, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "series_key"),
    )
    op.create_table(
        "silences",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("run", sa.String(128), nullable=True),
        sa.Column("rule", sa.String(64), nullable=True),
        sa.Column("labels", Json, nullable=False),
        sa.Column("until", Stamp, nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.Column("created_at", Stamp, nullable=False),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", BigId, primary_key=True),
        sa.Column(
            "alert_id", BigId, sa.ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("format", sa.String(8), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("payload", Json, nullable=False),
        sa.Column("next_at", Stamp, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("sent_at", Stamp, nullable=True),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_at"])
    op.create_table(
        "user_rules",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("rules", Json, nullable=False),
        sa.Column("source", sa.String(1000), nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("user_rules")
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.drop_table("deliveries")
    op.drop_table("silences")
    op.drop_table("rule_state")
    op.drop_index("ix_alerts_state", table_name="alerts")
    op.drop_index("uq_alerts_open", table_name="alerts")
    op.drop_table("alerts")
