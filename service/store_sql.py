"""Small SQL helpers shared by the store modules: dialect inserts, label keys, id caches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

__all__ = ["cache", "insert", "is_pg", "labels_key", "remember"]


def is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def insert(session: Session, table: Table) -> Any:
    """INSERT with on_conflict_* for the session's dialect (both speak ON CONFLICT)."""
    return (postgresql.insert if is_pg(session) else sqlite.insert)(table)


def labels_key(labels: Mapping[str, str]) -> str:
    """Canonical 'head=3,layer=0': keys sorted, the series' unique key within a metric."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def cache(session: Session) -> dict:
    """The per-process id cache shared by every session of one sessionmaker (see db.py)."""
    return session.info.setdefault("cache", {})


def remember(session: Session, items: Mapping) -> None:
    """Cache ids found or created in this transaction once it commits (never before:
    a rolled-back insert must not leave a dangling id behind)."""
    session.info.setdefault("pending", {}).update(items)
