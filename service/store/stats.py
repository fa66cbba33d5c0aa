"""How much the stored points cost: points, chunks and bytes in use, per database."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from logitwatch.service.store.models import Chunk
from logitwatch.service.store.reports import pending_points
from logitwatch.service.store.sql import is_pg

__all__ = ["StorageStats", "storage_stats"]

_TABLES = ("runs", "series", "chunks", "reports", "latest", "batches")


@dataclass(slots=True)
class StorageStats:
    points: int
    chunks: int
    #: Bytes in use: SQLite pages minus free pages; PostgreSQL tables + indexes + TOAST.
    bytes: int

    @property
    def bytes_per_point(self) -> float:
        return self.bytes / self.points if self.points else 0.0


def storage_stats(session: Session) -> StorageStats:
    chunks, points = session.execute(
        select(func.count(), func.coalesce(func.sum(Chunk.n), 0))
    ).one()
    if is_pg(session):
        used = sum(
            session.scalar(text("SELECT pg_total_relation_size(CAST(:t AS regclass))"), {"t": t})
            for t in _TABLES
        )
    else:
        pages = session.scalar(text("PRAGMA page_count"))
        free = session.scalar(text("PRAGMA freelist_count"))
        used = (pages - free) * session.scalar(text("PRAGMA page_size"))
    points = int(points) + pending_points(session)  # reports not yet turned into chunks
    return StorageStats(points=points, chunks=int(chunks), bytes=int(used))
