"""Background compaction: small raw chunks written by ingest become large compressed ones."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Compactor"]


class Compactor:
    """Collects series touched by ingest and merges their small chunks on a worker thread."""

    def __init__(self, sessions: sessionmaker[Session], lock: threading.Lock) -> None:
        self._sessions = sessions
        self._lock = lock

    def touch(self, series_ids: Iterable[int], segment: int) -> None:
        pass

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass
