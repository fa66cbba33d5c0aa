"""Chunk summaries: per-block min/max/first/last/NaN count of merged chunks, for long bucketed reads.

Revision ID: 0005_chunk_summaries
Revises: 0004_alertmanager
Create Date: 2026-12-06

Chunks from before this revision have no summary: reads take their points, with the same
answer, and chunks the compactor merges from now on get one.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_chunk_summaries"
down_revision = "0004_alertmanager"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "chunk_summaries",
        sa.Column(
            "chunk_id",
            BigId,
            sa.ForeignKey("chunks.id", ondelete="CASCADE"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("level", sa.Integer, nullable=False),
        sa.Column("blocks", sa.LargeBinary, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Uncompressed out-of-line storage: summaries barely compress, and reading them
        # back is then a copy rather than a pglz pass.
        op.execute("ALTER TABLE chunk_summaries ALTER COLUMN blocks SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("chunk_summaries")
