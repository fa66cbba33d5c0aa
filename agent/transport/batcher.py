"""The part of a sink that turns logged steps into columnar batches, on its own thread.

``log`` only appends to a deque (the training thread pays a dict copy); a collector thread
wakes every interval, groups the rows per series into packed arrays (logitwatch.protocol's
``Batch``), stamps each batch with (client, seq, segment) and hands it to the sink's ``_emit``.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import secrets
import threading
import time as _time
from array import array
from collections import deque
from collections.abc import Mapping
from typing import Any

from logitwatch.agent.transport.sink import SeriesKey, Sink
from logitwatch.protocol import (
    MAX_STEP,
    Batch,
    ProtocolError,
    Series,
    check_label_key,
    check_label_value,
    check_metric_name,
    check_run_name,
)

__all__ = ["BatchingSink", "LogOnce", "new_client_id"]

log = logging.getLogger("logitwatch.agent")

_BYTES_PER_QUEUED_POINT = 120  # a float and its key in a copied dict, roughly


def new_client_id() -> str:
    """A random id per sink: with ``seq`` it makes every batch unique on the service."""
    return "c" + secrets.token_hex(8)


class LogOnce:
    """Logs a warning the first time each kind of trouble happens, then counts silently."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, msg: str, *args: Any) -> None:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        if n == 0:
            log.warning(msg + " (logged once)", *args)


class _RunEntry:
    __slots__ = ("config", "tags")

    def __init__(self, config: Mapping[str, Any] | None, tags: Mapping[str, str] | None):
        self.config = dict(config or {})
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}


class BatchingSink(Sink):
    """Base of the HTTP and file sinks: a bounded row queue and a collector thread.

    Subclasses implement ``_emit_batch(batch)``, ``_emit_run(entry)``, and may override
    ``_prepare()`` (run once on the collector thread before the first batch),
    ``_delivered()`` (what ``flush`` waits for) and ``_finish(deadline)`` (close).
    """

    def __init__(
        self,
        run: str,
        *,
        interval: float,
        max_points_per_batch: int,
        max_queue_bytes: float,
        close_timeout: float,
        name: str,
    ) -> None:
        self.run = check_run_name(run)
        self.client = new_client_id()
        self.segment = 0
        self.last_step: int | None = None
        self.dropped_points = 0
        self.once = LogOnce()
        self._interval = interval
        self._max_points = max_points_per_batch
        self._max_queued_points = max(1000, int(max_queue_bytes / _BYTES_PER_QUEUED_POINT))
        self._close_timeout = close_timeout
        self._seq = 0
        self._rows: deque = deque()
        # Each counter has one writer (log vs. the collector), so no lock on the hot path.
        self._logged_rows = self._logged_points = 0
        self._taken_rows = self._taken_points = 0
        self._keys: dict[Any, tuple[str, dict[str, str]] | None] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._drain_lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()  # a forked child (a data-loader worker) has no sender threads
        self._collector = threading.Thread(target=self._collect_loop, name=name, daemon=True)

    def _start(self) -> None:
        self._collector.start()
        # A script that ends without close() still gets its last steps delivered or spooled.
        atexit.register(self.close)

    # -- the training thread's side ------------------------------------------------------
    def register_run(self, run, *, config=None, tags=None) -> None:
        try:
            if run != self.run:
                self.once("run", "register_run(%r) on a sink for run %r: ignored", run, self.run)
                return
            self._rows.append(_RunEntry(config, tags))
            self._logged_rows += 1
            self._wake.set()
        except Exception as exc:  # never raise into training
            self.once("register", "register_run failed: %r", exc)

    def log(self, step, values, *, time=None) -> None:
        try:
            if self._closed:
                return
            n = len(values)
            queued = self._logged_points - self._taken_points
            if queued + n > self._max_queued_points:
                # Only when the collector cannot keep up (it does no network I/O): drop.
                self.dropped_points += n
                self.once("queue full", "sink queue full (%d points): dropping steps", queued)
                self._wake.set()
                return
            self._rows.append((step, _time.time() if time is None else time, dict(values)))
            self._logged_points += n
            self._logged_rows += 1
            if queued + n >= self._max_points:
                self._wake.set()
        except Exception as exc:
            self.once("log", "log(step=%r) failed: %r", step, exc)

    def flush(self, timeout: float | None = None) -> bool:
        timeout = self._close_timeout if timeout is None else timeout
        target = self._logged_rows
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(
                lambda: self._taken_rows >= target and self._delivered(), max(0.0, timeout)
            )

    def close(self, timeout: float | None = None) -> None:
        if self._closed or os.getpid() != self._pid:
            return
        atexit.unregister(self.close)
        timeout = self._close_timeout if timeout is None else timeout
        deadline = _time.monotonic() + max(0.0, timeout)
        try:
            self.flush(0.9 * timeout)
            self._closed = True
            self._stop.set()
            self._wake.set()
            self._collector.join(max(0.0, deadline - _time.monotonic()))
            # A collector stuck at start-up (a service that accepts and never answers)
            # still holds the last steps: convert them here so they reach the spool.
            if self._collector.is_alive() and self._drain_lock.acquire(
                timeout=max(0.0, (deadline - _time.monotonic()) / 2)
            ):
                try:
                    self._drain()
                finally:
                    self._drain_lock.release()
            self._finish(deadline)
        except Exception as exc:
            self.once("close", "closing the sink failed: %r", exc)

    # -- hooks for subclasses ------------------------------------------------------------
    def _prepare(self) -> None:
        pass

    def _emit_batch(self, batch: Batch) -> None:
        raise NotImplementedError

    def _emit_run(self, entry: _RunEntry) -> None:
        raise NotImplementedError

    def _delivered(self) -> bool:
        return True

    def _finish(self, deadline: float) -> None:
        pass

    def _notify(self) -> None:
        with self._progress:
            self._progress.notify_all()

    # -- the collector thread -------------------------------------------------------------
    def _collect_loop(self) -> None:
        try:
            self._prepare()
        except Exception as exc:
            self.once("prepare", "sink start-up failed: %r", exc)
        while True:
            stopping = self._stop.is_set()
            try:
                with self._drain_lock:
                    self._drain()
            except Exception as exc:  # a bug here must not kill the thread silently
                self.once("collector", "sink collector error: %r", exc)
            self._notify()
            if stopping:
                return
            self._wake.wait(self._interval)
            self._wake.clear()

    def _drain(self) -> None:
        rows = []
        while self._rows:
            rows.append(self._rows.popleft())
        if not rows:
            return
        cols: dict[Any, tuple[array, array, array]] = {}
        n_points = taken = 0
        try:
            for row in rows:
                if isinstance(row, _RunEntry):
                    self._emit_columns(cols)
                    cols, n_points = {}, 0
                    self._emit_run(row)
                    continue
                step, t, values = row
                taken += len(values)
                n_points += self._add_row(cols, step, t, values)
                if n_points >= self._max_points:
                    self._emit_columns(cols)
                    cols, n_points = {}, 0
            self._emit_columns(cols)
        finally:
            # Counted only now that every batch is routed: flush() must not see them early.
            self._taken_points += taken
            self._taken_rows += len(rows)

    def _add_row(self, cols, step, t, values: Mapping[SeriesKey, float]) -> int:
        try:
            step = int(step)
            t = float(t)
        except (TypeError, ValueError):
            self.once("bad step", "bad step or time %r/%r: step skipped", step, t)
            return 0
        if not 0 <= step <= MAX_STEP:
            self.once("bad step", "step %d is outside 0..2**62: step skipped", step)
            return 0
        if self.last_step is None or step > self.last_step:
            self.last_step = step
        added = 0
        for key, v in values.items():
            col = cols.get(key)
            if col is None:
                if self._series_of(key) is None:
                    continue
                col = cols[key] = (array("q"), array("d"), array("d"))
            try:
                v = float(v)
            except (TypeError, ValueError):
                self.once(f"bad value {key!r}", "bad value %r for %r: skipped", v, key)
                continue
            col[0].append(step)
            col[1].append(v)
            col[2].append(t if math.isfinite(t) else 0.0)
            added += 1
        return added

    def _series_of(self, key: Any) -> tuple[str, dict[str, str]] | None:
        """Validate a series key once: the service would reject the whole batch for it."""
        if key in self._keys:
            return self._keys[key]
        try:
            metric, pairs = (key, ()) if isinstance(key, str) else key
            check_metric_name(metric)
            labels = {
                check_label_key(k, f"{metric}.labels"): check_label_value(v, f"{metric}.{k}")
                for k, v in pairs
            }
            self._keys[key] = (metric, labels)
        except (ProtocolError, TypeError, ValueError) as exc:
            self.once(f"bad key {key!r}", "series %r is not valid (%s): skipped", key, exc)
            self._keys[key] = None
        return self._keys[key]

    def _emit_columns(self, cols: dict) -> None:
        series = []
        for key, (steps, values, times) in cols.items():
            if steps:
                metric, labels = self._keys[key]
                series.append(Series(metric, labels, steps, values, times))
        if not series:
            return
        self._seq += 1
        self._emit_batch(
            Batch(client=self.client, seq=self._seq, segment=self.segment, series=series)
        )
