"""Alerts remember the step they fired at and what Alertmanager has been told of them.

Revision ID: 0004_alertmanager
Revises: 0003_views
Create Date: 2026-12-06

Rows from before this revision keep ``fired_step`` NULL (readers fall back to first_step) and
are never sent to Alertmanager: nothing scheduled them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_alertmanager"
down_revision = "0003_views"
branch_labels = None
depends_on = None

Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("alerts", sa.Column("fired_step", sa.BigInteger, nullable=True))
    op.add_column("alerts", sa.Column("am_due_at", Stamp, nullable=True))
    op.add_column("alerts", sa.Column("am_sent_at", Stamp, nullable=True))
    op.add_column("alerts", sa.Column("am_failures", sa.Integer, nullable=True))
    op.create_index("ix_alerts_am_due", "alerts", ["am_due_at"])


def downgrade() -> None:
    op.drop_index("ix_alerts_am_due", table_name="alerts")
    with op.batch_alter_table("alerts") as batch:  # SQLite drops columns by copying the table
        for name in ("am_failures", "am_sent_at", "am_due_at", "fired_step"):
            batch.drop_column(name)
