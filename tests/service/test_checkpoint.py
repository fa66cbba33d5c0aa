"""The SQLite checkpointer: the write-ahead log copied and started over off the commit path."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

from sqlalchemy import text

from logitwatch.service.store.checkpoint import Checkpointer
from logitwatch.service.store.db import Writer, make_engine, make_sessionmaker


class _Counted:
    """A lock that counts how often it was taken."""

    def __init__(self) -> None:
        self.lock, self.taken = threading.Lock(), 0

    def __enter__(self):
        self.lock.acquire()
        self.taken += 1

    def __exit__(self, *exc):
        self.lock.release()


def _write(writer: Writer, rows: int) -> None:
    with writer() as s:
        s.execute(text("CREATE TABLE IF NOT EXISTS scratch (x BLOB)"))
        for _ in range(rows):
            s.execute(text("INSERT INTO scratch VALUES (randomblob(4000))"))
        s.commit()


def _log_pages(path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def test_a_long_log_is_copied_under_the_write_lock_and_then_starts_over(tmp_path):
    path = tmp_path / "ck.db"
    engine = make_engine(f"sqlite:///{path}")
    writer = Writer(engine, make_sessionmaker(engine))
    lock = _Counted()
    ck = Checkpointer(path, lock, restart_pages=100)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        _write(writer, 20)  # a short log: copied without the lock
        pages, copied = ck.checkpoint(conn)
        assert 0 < pages < 100 and copied == pages and lock.taken == 0
        _write(writer, 200)  # past restart_pages: the last round holds the lock
        pages, copied = ck.checkpoint(conn)
        assert pages >= 100 and copied == pages and lock.taken == 1
    _write(writer, 1)  # the next write starts the log over
    assert _log_pages(path) < 10
    engine.dispose()


def test_the_thread_copies_the_log_into_the_database_file_and_stops(tmp_path):
    path = tmp_path / "ck.db"
    engine = make_engine(f"sqlite:///{path}")
    writer = Writer(engine, make_sessionmaker(engine))
    _write(writer, 0)
    before = path.stat().st_size
    ck = Checkpointer(path, writer.lock, interval_s=0.01)
    ck.start()
    try:
        _write(writer, 200)  # ~200 pages, in the log only (wal_autocheckpoint is far off)
        deadline = time.monotonic() + 10
        while path.stat().st_size < before + 200 * 4000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.stat().st_size >= before + 200 * 4000
    finally:
        ck.close()
    assert not ck._worker.running
    engine.dispose()
