"""SQLite's write-ahead log copied into the database file off the commit path."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path

from logitwatch.service.store.worker import Worker

__all__ = ["Checkpointer"]

_log = logging.getLogger(__name__)


class Checkpointer:
    """SQLite: the write-ahead log copied back into the database file by a thread of its own.

    SQLite checkpoints inside the commit that grows the log past ``wal_autocheckpoint``
    pages: under a fleet's load (~60 KB of pages a report, 500 reports a second) that was a
    ~60 ms commit every ~1.5 s, stalling every request waiting on the group commit: the
    fleet's p99, measured. Here a PASSIVE checkpoint from a connection of its own copies the
    log every ``interval_s`` beside the writer (it takes no write lock, and the sqlite3
    module lets go of the GIL while it runs). The log starts over only when a write begins
    with every page of it copied, which never happens while writes keep coming; so once the
    log holds ``restart_pages``, the checkpointer copies what the last few milliseconds
    added while it holds this process's write lock (``lock``), and the next write starts the
    log over. The commits' own check (``wal_autocheckpoint``, 20,000 pages) stays as the
    backstop, for other processes' writes.

    >>> Checkpointer(Path("data.db"), writer.lock).start()  # doctest: +SKIP
    """

    def __init__(
        self,
        path: Path,
        lock: contextlib.AbstractContextManager,
        *,
        interval_s: float = 0.2,
        restart_pages: int = 8000,
    ) -> None:
        self._path = path
        self._lock = lock
        self._interval_s = interval_s
        self._restart_pages = restart_pages
        self._stop = threading.Event()
        self._worker = Worker("logitwatch-checkpoint", self._loop, self._stop)

    def start(self) -> None:
        self._worker.start()

    def close(self) -> None:
        self._worker.close()

    def checkpoint(self, conn: sqlite3.Connection) -> tuple[int, int]:
        """One round: (pages in the log, pages copied) after it."""
        sql = "PRAGMA wal_checkpoint(PASSIVE)"
        _, pages, copied = conn.execute(sql).fetchone()
        if pages >= self._restart_pages:
            # Again unlocked (what came meanwhile) until a round is quick, then under the
            # write lock only what came during that one: ~1-3 ms of holding it.
            for _ in range(4):
                start = time.perf_counter()
                conn.execute(sql).fetchone()
                if time.perf_counter() - start < 0.002:
                    break
            with self._lock:  # no write of this process adds to the log meanwhile
                _, pages, copied = conn.execute(sql).fetchone()
        return pages, copied

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        failed = False
        while not self._stop.wait(self._interval_s):
            try:
                if conn is None:
                    conn = sqlite3.connect(self._path, isolation_level=None)
                    conn.execute("PRAGMA synchronous=NORMAL")
                self.checkpoint(conn)
                failed = False
            except sqlite3.Error:
                if not failed:  # the commits' own checkpoints go on; said once per spell
                    _log.exception("checkpoint of %s failed", self._path)
                failed = True
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
