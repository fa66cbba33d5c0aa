"""Initial schema: runs, series, chunks, latest, batches, tokens.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Steps = sa.LargeBinary().with_variant(postgresql.ARRAY(sa.BigInteger()), "postgresql")
Floats = sa.LargeBinary().with_variant(postgresql.ARRAY(sa.Double()), "postgresql")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("config", Json, nullable=False),
        sa.Column("tags", Json, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.Column("last_seen_at", Stamp, nullable=True),
    )
    op.create_table(
        "series",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("run_id", BigId, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("metric", sa.String(128), nullable=False),
        sa.Column("labels", Json, nullable=False),
        sa.Column("labels_key", sa.String(1200), nullable=False),
        sa.Column("layer", sa.Integer, nullable=True),
        sa.Column("head", sa.Integer, nullable=True),
        sa.UniqueConstraint("run_id", "metric", "labels_key", name="uq_series_key"),
    )
    op.create_table(
        "chunks",
        sa.Column("id", BigId, primary_key=True),
        sa.Column(
            "series_id", BigId, sa.ForeignKey("series.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("segment", sa.Integer, nullable=False),
        sa.Column("step_min", sa.BigInteger, nullable=False),
        sa.Column("step_max", sa.BigInteger, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("steps", Steps, nullable=False),
        sa.Column("values", Floats, nullable=False),
        sa.Column("times", Floats, nullable=False),
    )
    op.create_index("ix_chunks_series", "chunks", ["series_id", "segment", "step_min"])
    op.create_table(
        "latest",
        sa.Column(
            "series_id",
            BigId,
            sa.ForeignKey("series.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("segment", sa.Integer, nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("value", sa.Double, nullable=True),
        sa.Column("time", sa.Double, nullable=True),
        sa.Column("n_points", sa.BigInteger, nullable=False),
        sa.Column("first_step", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "batches",
        sa.Column("run_id", BigId, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("client", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("received_at", Stamp, nullable=False),
        sa.Column("n_points", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_hash", sa.String(128), nullable=False, unique=True),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("run_pattern", sa.String(256), nullable=True),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("revoked_at", Stamp, nullable=True),
    )


def downgrade() -> None:
    for table in ("tokens", "batches", "latest", "chunks", "series", "runs"):
        op.drop_table(table)
