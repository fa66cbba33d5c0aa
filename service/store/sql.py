"""Small SQL helpers shared by the store modules: dialect inserts, label keys, id caches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from logitwatch.service.store.codec import pg_array_bytes

__all__ = [
    "PgArray",
    "PgInt8Array",
    "cache",
    "insert",
    "insert_chunks",
    "is_pg",
    "labels_key",
    "pg_arrays",
    "remember",
]


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


_COLS = 'series_id, segment, step_min, step_max, n, steps, "values", times'
_SQLITE_CHUNKS = f"INSERT INTO chunks ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_SQLITE_CHUNKS_ID = f"INSERT INTO chunks (id, {_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
# %b: psycopg sends the arrays in binary, ~4x cheaper than their text form.
_PG_CHUNKS = f"INSERT INTO chunks ({_COLS}) VALUES (%s, %s, %s, %s, %s, %b, %b, %b)"
_PG_CHUNKS_ID = f"INSERT INTO chunks (id, {_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %b, %b, %b)"


def insert_chunks(session: Session, rows: list[tuple], *, with_id: bool = False) -> None:
    """Insert chunk rows (tuples in column order, id first when with_id) in one executemany.

    Straight to the driver on the session's connection (same transaction): SQLAlchemy's
    per-row parameter processing would cost more than the inserts themselves. Payloads
    are bytes from codec.py on SQLite and lists on PostgreSQL.
    """
    if not rows:
        return
    raw = session.connection().connection.driver_connection
    if is_pg(session):
        with raw.cursor() as cur:
            cur.executemany(_PG_CHUNKS_ID if with_id else _PG_CHUNKS, rows)
    else:
        raw.executemany(_SQLITE_CHUNKS_ID if with_id else _SQLITE_CHUNKS, rows)


class PgArray:
    """A float8[] already in PostgreSQL's binary form (built by numpy, see codec.pg_array_bytes).

    psycopg's own list dumper packs element by element in Python, which cost more than the
    rest of a PostgreSQL ingest; this hands over bytes made in one numpy pass.
    """

    __slots__ = ("data",)
    oid = 1022  # float8[]

    def __init__(self, data: bytes) -> None:
        self.data = data


class PgInt8Array(PgArray):
    __slots__ = ()
    oid = 1016  # int8[]


def pg_arrays(steps: np.ndarray, values: np.ndarray, times: np.ndarray) -> tuple:
    return (
        PgInt8Array(pg_array_bytes(steps, "i8")),
        PgArray(pg_array_bytes(values, "f8")),
        PgArray(pg_array_bytes(times, "f8")),
    )


def _register_pg_dumpers() -> None:
    try:
        import psycopg
        from psycopg.adapt import Dumper
        from psycopg.pq import Format
    except ImportError:  # an SQLite-only install
        return
    for cls in (PgArray, PgInt8Array):
        dumper = type(
            f"{cls.__name__}Dumper",
            (Dumper,),
            {"format": Format.BINARY, "oid": cls.oid, "dump": lambda self, obj: obj.data},
        )
        psycopg.adapters.register_dumper(cls, dumper)


_register_pg_dumpers()
