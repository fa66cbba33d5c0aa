"""SQLAlchemy 2.0 models: runs, series, chunks of points and their summaries, reports,
latest values, batches, tokens.

Points live in chunks, one row per (series, segment, step range) holding packed arrays:
PostgreSQL int8[]/float8[] (Grafana's SQL can unnest them), SQLite bytes (see codec.py).
A batch of one point per series (a training step's report) is first stored as one row of
reports, which the compactor turns into chunks (reports.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "Batch",
    "Chunk",
    "ChunkSummary",
    "Latest",
    "Report",
    "Run",
    "Series",
    "Token",
    "UtcDateTime",
    "utcnow",
]

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets bigint identities.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(postgresql.JSONB(), "postgresql")
Steps = LargeBinary().with_variant(postgresql.ARRAY(BigInteger()), "postgresql")
Floats = LargeBinary().with_variant(postgresql.ARRAY(Double()), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(t: datetime) -> datetime:
    # A naive datetime means UTC: the service writes nothing else.
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` (the migrations' type) that takes and gives aware UTC datetimes.

    SQLite keeps no zone (SQLAlchemy stores naive text, which must be UTC to compare right) and
    PostgreSQL's timestamptz comes back in the session's zone; callers see UTC from either.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else _as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else _as_utc(value)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    config: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    tags: Mapped[Any] = mapped_column(Json, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("run_id", "metric", "labels_key", name="uq_series_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    metric: Mapped[str] = mapped_column(String(128))
    labels: Mapped[dict[str, str]] = mapped_column(Json, default=dict)
    #: Canonical 'head=3,layer=0' (keys sorted): the unique key and the label filter.
    labels_key: Mapped[str] = mapped_column(String(1200))
    layer: Mapped[int | None] = mapped_column(Integer)
    head: Mapped[int | None] = mapped_column(Integer)


class Chunk(Base):
    __tablename__ = "chunks"
    __table_args__ = (Index("ix_chunks_series", "series_id", "segment", "step_min"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    segment: Mapped[int] = mapped_column(Integer)
    step_min: Mapped[int] = mapped_column(BigInteger)
    step_max: Mapped[int] = mapped_column(BigInteger)
    n: Mapped[int] = mapped_column(Integer)
    #: Steps ascending and unique within a chunk; equal steps in two chunks of one segment
    #: resolve to the chunk with the larger id (the later write).
    steps: Mapped[Any] = mapped_column(Steps)
    values: Mapped[Any] = mapped_column(Floats)
    #: Unix seconds, or empty when the client sent none.
    times: Mapped[Any] = mapped_column(Floats)


class ChunkSummary(Base):
    """Per-block min/max/first/last/NaN count of a chunk the compactor merged (summary.py).

    Bucketed reads of long ranges sum these instead of the points. A chunk without one (fresh
    from ingest, or written before revision 0005) is read point by point, with the same answer.
    """

    __tablename__ = "chunk_summaries"

    chunk_id: Mapped[int] = mapped_column(
        ForeignKey("chunks.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    #: Blocks span 2**level steps, aligned to multiples of it.
    level: Mapped[int] = mapped_column(Integer)
    blocks: Mapped[bytes] = mapped_column(LargeBinary)


class Report(Base):
    """One batch of one point per series, as one row: its series ids (ascending) and their
    points, position by position. Newer than every chunk of its run: reads put its points
    after the run's chunks, and ingest turns a run's reports into chunks (reports.flush)
    before it writes a chunk of that run. See reports.py for the SQLite encoding.
    """

    __tablename__ = "reports"
    __table_args__ = (Index("ix_reports_run", "run_id", "segment"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    segment: Mapped[int] = mapped_column(Integer)
    step_min: Mapped[int] = mapped_column(BigInteger)
    step_max: Mapped[int] = mapped_column(BigInteger)
    #: Series (and points) in the row.
    n: Mapped[int] = mapped_column(Integer)
    series_ids: Mapped[Any] = mapped_column(Steps)
    steps: Mapped[Any] = mapped_column(Steps)
    values: Mapped[Any] = mapped_column(Floats)
    #: One per series, or empty when the client sent none.
    times: Mapped[Any] = mapped_column(Floats)


class Latest(Base):
    """Each series' newest point: the largest (segment, step). Read by /metrics and overviews.

    ``value`` is NULL for NaN on SQLite (SQLite stores a NaN REAL as NULL); read NULL as NaN.
    """

    __tablename__ = "latest"
    # Room on each page for a row's next version: a report's updates stay HOT (migration 0008).
    __table_args__ = ({"postgresql_with": {"fillfactor": 50}},)

    series_id: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="CASCADE"), primary_key=True
    )
    segment: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float | None] = mapped_column(Double)
    time: Mapped[float | None] = mapped_column(Double)
    #: Points received (every segment, counting a step rewritten by a later batch again).
    n_points: Mapped[int] = mapped_column(BigInteger)
    first_step: Mapped[int] = mapped_column(BigInteger)


class Batch(Base):
    """Idempotency record: a (run, client, seq) already stored is acknowledged, not stored again."""

    __tablename__ = "batches"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    client: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    n_points: Mapped[int] = mapped_column(BigInteger)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    run_pattern: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
