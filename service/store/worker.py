"""One daemon thread a background part of the service runs its loop on, started and stopped
the same way by each (the compactor, the checkpointer, the absent checker, the notifiers)."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Worker"]


class Worker:
    """``target`` on a daemon thread named ``name`` until ``stop`` is set.

    ``start`` is idempotent and clears ``stop`` (a closed part starts again); ``close`` sets
    ``stop`` and each of ``wake`` (the events the loop sleeps on), then waits up to
    ``join_s`` for the thread.

    >>> stop = threading.Event()
    >>> w = Worker("demo", lambda: stop.wait(), stop)
    >>> w.start(); w.running, w.close(), w.running
    (True, None, False)
    """

    def __init__(
        self,
        name: str,
        target: Callable[[], None],
        stop: threading.Event,
        *wake: threading.Event,
        join_s: float = 30.0,
    ) -> None:
        self.name, self._target, self._stop, self._wake = name, target, stop, wake
        self.join_s = join_s
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._target, name=self.name, daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        for event in self._wake:
            event.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_s)
            self._thread = None
