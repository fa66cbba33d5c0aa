"""Small SQL helpers shared by the store modules: dialect inserts, label keys, id caches."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from logitwatch.service.store.codec import pg_array_bytes
from logitwatch.service.store.deferred import flush_deferred

__all__ = [
    "PgArray",
    "PgInt8Array",
    "cache",
    "insert",
    "insert_chunks",
    "is_pg",
    "labels_key",
    "pg_arrays",
    "pg_one",
    "remember",
]


def is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def insert(session: Session, table: Table) -> Any:
    """INSERT with on_conflict_* for the session's dialect (both speak ON CONFLICT)."""
    return (postgresql.insert if is_pg(session) else sqlite.insert)(table)


def labels_key(labels: Mapping[str, str]) -> str:
    """Canonical 'head=3,layer=0': keys sorted, the series' unique key within a metric."""
    items = tuple(labels.items())
    key = _LABELS_KEYS.get(items)
    if key is None:
        key = ",".join(f"{k}={labels[k]}" for k in sorted(labels))
        # Only all-string labels are kept, so a hit needs no type check (True == 1, but
        # no string equals either).
        if len(_LABELS_KEYS) < 100_000 and all(type(v) is str for v in labels.values()):
            _LABELS_KEYS[items] = key
    return key


#: labels_key of the label sets seen: a fleet sends the same few hundred in every request.
_LABELS_KEYS: dict[tuple, str] = {}


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
# PostgreSQL's binary COPY: a header, then per row the number of fields and each field as
# (length, bytes): series_id int8, segment int4, step_min int8, step_max int8, n int4, then
# the three arrays in their binary form (PgArray.data); an id int8 first when given.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_PG_ROW = struct.Struct(">h iq ii iq iq ii")
_PG_ROW_ID = struct.Struct(">h iq iq ii iq iq ii")


def _row_head(head: list, with_id: bool) -> tuple:
    if with_id:
        cid, sid, seg, lo, hi, n = head
        return (9, 8, cid, 8, sid, 4, seg, 8, lo, 8, hi, 4, n)
    sid, seg, lo, hi, n = head
    return (8, 8, sid, 4, seg, 8, lo, 8, hi, 4, n)


def _field(a: PgArray) -> bytes:
    return len(a.data).to_bytes(4, "big") + a.data


def insert_chunks(session: Session, rows: list[tuple], *, with_id: bool = False) -> None:
    """Insert chunk rows (tuples in column order, id first when with_id): one executemany on
    SQLite, one binary COPY on PostgreSQL.

    Straight to the driver on the session's connection (same transaction): SQLAlchemy's
    per-row parameter processing would cost more than the inserts themselves. Payloads
    are bytes from codec.py on SQLite and PgArray (pg_arrays, pg_one) on PostgreSQL.
    """
    if not rows:
        return
    if is_pg(session):
        conn = session.connection()
        flush_deferred(conn)  # COPY goes after the deferred statements
        raw = conn.connection.driver_connection
        # COPY in binary, each row packed by struct: psycopg's executemany costs ~20 us of
        # Python a row, more than all the rest of a one-point series' ingest.
        cols = f"{'id, ' if with_id else ''}{_COLS}"
        pack = _PG_ROW_ID if with_id else _PG_ROW
        data = [_COPY_HEADER]
        for r in rows:
            *head, steps, values, times = r
            data += (
                pack.pack(*_row_head(head, with_id)),
                _field(steps),
                _field(values),
                _field(times),
            )
        data.append(_COPY_TRAILER)
        _copy(raw, cols, b"".join(data))
    else:
        raw = session.connection().connection.driver_connection
        raw.executemany(_SQLITE_CHUNKS_ID if with_id else _SQLITE_CHUNKS, rows)


def _copy(raw: Any, cols: str, data: bytes) -> None:
    with raw.cursor() as cur, cur.copy(f"COPY chunks ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(data)


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


def pg_one(step: int, value: float, time: float | None) -> tuple:
    """pg_arrays of a one-point series, packed by struct: numpy's per-call cost would be
    most of the work of a one-step batch's series."""
    return (
        PgInt8Array(_ONE_I8.pack(1, 0, 20, 1, 1, 8, step)),
        PgArray(_ONE_F8.pack(1, 0, 701, 1, 1, 8, value)),
        PgArray(_NO_F8 if time is None else _ONE_F8.pack(1, 0, 701, 1, 1, 8, time)),
    )


# ndim, has-null, element oid, (size, lower bound), then (length, value): see codec.pg_array
_ONE_I8 = struct.Struct(">iiiiiiq")
_ONE_F8 = struct.Struct(">iiiiiid")
_NO_F8 = struct.pack(">iii", 0, 0, 701)


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
