"""Sinks that forward a run to another tool (W&B, TensorBoard) from a writer thread of their own.

``log`` only appends to a deque, as the HTTP sink does; the tool's own logging call, which
costs a millisecond or more per step, runs on the writer thread, never on the training thread.
"""

from __future__ import annotations

import atexit
import os
import threading
import time as _time
from collections import deque
from collections.abc import Mapping
from typing import Any

from logitwatch.agent.transport.batcher import LogOnce
from logitwatch.agent.transport.sink import SeriesKey, Sink

__all__ = ["ForwardingSink", "alert_text", "alert_title", "tag_of"]

_BYTES_PER_QUEUED_POINT = 120  # as in batcher.py: a float and its key in a copied dict
# Labels in the order a reader looks for them: logitwatch/attn.logit_max/layer0/head3.
_LABEL_ORDER = {"rank": 0, "layer": 1, "head": 2, "group": 3}


def tag_of(key: SeriesKey | str, prefix: str = "logitwatch") -> str:
    """The W&B key and TensorBoard tag of a series: slash-separated, labels as name+value.

    >>> tag_of(("attn.logit_max", (("head", "3"), ("layer", "0"))))
    'logitwatch/attn.logit_max/layer0/head3'
    >>> tag_of(("lr", (("group", "no_decay"),)), prefix="")
    'lr/group_no_decay'
    """
    metric, pairs = (key, ()) if isinstance(key, str) else key
    parts = [prefix] if prefix else []
    parts.append(str(metric))
    for k, v in sorted(pairs, key=lambda kv: (_LABEL_ORDER.get(kv[0], 9), kv[0])):
        v = str(v).replace("/", "_")  # a slash would open another level of the hierarchy
        parts.append(f"{k}{v}" if v.isdigit() else f"{k}_{v}")
    return "/".join(parts)


def alert_title(alert: Mapping[str, Any]) -> str:
    """One line naming the rule and the series, e.g. ``attn-logit-high layer=0 head=1``."""
    labels = " ".join(f"{k}={v}" for k, v in sorted((alert.get("labels") or {}).items()))
    return " ".join(p for p in (str(alert.get("rule") or "alert"), labels) if p)


def alert_text(alert: Mapping[str, Any]) -> str:
    """What fired, where, and the cure (the rule's hint), in a few Markdown lines."""
    where = f"`{alert.get('metric')}`" if alert.get("metric") else "a series"
    lines = [
        f"**{alert.get('severity', 'warning')}** {alert_title(alert)}: {where} = "
        f"{alert.get('value')} at step {alert.get('first_step')}"
        + (f" (threshold {alert['threshold']})" if alert.get("threshold") is not None else "")
    ]
    if alert.get("hint"):
        lines.append(f"Hint: {alert['hint']}")
    if alert.get("dashboard"):
        lines.append(f"Dashboard: {alert['dashboard']}")
    if alert.get("run"):
        lines.append(f"Run: {alert['run']}")
    return "\n\n".join(lines)


class ForwardingSink(Sink):
    """Base of WandbSink and TensorBoardSink: a bounded queue and one writer thread.

    Subclasses implement ``_write_step(step, time, values)`` with values keyed by tag, and may
    implement ``_write_alert(alert)``, ``_write_run(run, config)``, ``_flush_tool()`` and
    ``_close_tool()``; every one of them runs on the writer thread, and what they raise is
    logged once and swallowed.
    """

    def __init__(
        self,
        *,
        prefix: str,
        interval: float,
        max_queue_mb: float,
        close_timeout: float,
        alerts: bool,
        name: str,
    ) -> None:
        if not isinstance(prefix, str) or prefix.endswith("/"):
            raise ValueError(f"prefix must be a name without a trailing slash, not {prefix!r}.")
        if not (isinstance(interval, int | float) and interval > 0):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}.")
        if not (isinstance(close_timeout, int | float) and close_timeout >= 0):
            raise ValueError(f"close_timeout must be >= 0 seconds, not {close_timeout!r}.")
        self.prefix = prefix
        self.forward_alerts = alerts
        self.dropped_points = 0
        self.written_steps = 0
        self.once = LogOnce()
        self._interval = float(interval)
        self._close_timeout = float(close_timeout)
        self._max_points = max(1000, int(max_queue_mb * 2**20 / _BYTES_PER_QUEUED_POINT))
        self._items: deque = deque()
        # Each counter has one writer (the caller of log vs. the writer thread): no lock.
        self._queued = self._queued_points = 0
        self._taken = self._taken_points = 0
        self._tags: dict[Any, str | None] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._closed = False
        self._pid = os.getpid()  # a forked child (a data-loader worker) has no writer thread
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        # A script that ends without close() still gets its last steps written.
        atexit.register(self.close)

    # -- the caller's side (the Monitor's report thread, or the training thread) ------------
    def log(self, step, values, *, time=None) -> None:
        try:
            if self._closed:
                return
            n = len(values)
            queued = self._queued_points - self._taken_points
            if queued + n > self._max_points:
                # Only when the tool cannot keep up with the steps: drop rather than grow.
                self.dropped_points += n
                self.once("queue full", "%s queue full (%d points): dropping steps", self, queued)
                self._wake.set()
                return
            self._items.append((0, step, _time.time() if time is None else time, dict(values)))
            self._queued_points += n
            self._queued += 1
        except Exception as exc:  # never raise into training
            self.once("log", "%s: log(step=%r) failed: %r", self, step, exc)

    def alert(self, alert: Mapping[str, Any]) -> None:
        try:
            if self.forward_alerts and not self._closed:
                self._items.append((1, dict(alert)))
                self._queued += 1
                self._wake.set()  # rare and urgent: written now, not at the next interval
        except Exception as exc:
            self.once("alert", "%s: alert(%r) failed: %r", self, alert, exc)

    def register_run(self, run, *, config=None, tags=None) -> None:
        try:
            if not self._closed:
                info = {"config": dict(config or {}), "tags": dict(tags or {})}
                self._items.append((2, run, info))
                self._queued += 1
        except Exception as exc:
            self.once("register", "%s: register_run failed: %r", self, exc)

    def flush(self, timeout: float | None = None) -> bool:
        timeout = self._close_timeout if timeout is None else timeout
        target = self._queued
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(lambda: self._taken >= target, max(0.0, timeout))

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
            # A tool that hangs (a W&B service process that died) keeps its daemon thread.
            self._thread.join(max(0.0, deadline - _time.monotonic()))
        except Exception as exc:
            self.once("close", "%s: close failed: %r", self, exc)

    def __repr__(self) -> str:
        return type(self).__name__

    # -- hooks for subclasses (writer thread) -------------------------------------------------
    def _write_step(self, step: int, time: float, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _write_alert(self, alert: dict[str, Any]) -> None:
        pass

    def _write_run(self, run: str, info: dict[str, Any]) -> None:
        pass

    def _flush_tool(self) -> None:
        pass

    def _close_tool(self) -> None:
        pass

    # -- the writer thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self._drain()
            with self._progress:
                self._progress.notify_all()
            if stopping:
                break
            self._wake.wait(self._interval)
            self._wake.clear()
        self._guard("close", self._close_tool)

    def _drain(self) -> None:
        wrote = False
        while self._items:
            item = self._items.popleft()
            try:
                if item[0] == 0:
                    _, step, t, values = item
                    self._taken_points += len(values)
                    named = self._named(values)
                    self.written_steps += self._guard(
                        "write", self._write_step, int(step), float(t), named
                    )
                elif item[0] == 1:
                    self._guard("alert", self._write_alert, item[1])
                else:
                    self._guard("run", self._write_run, item[1], item[2])
                wrote = True
            except (TypeError, ValueError) as exc:
                self.once("bad step", "%s: bad step %r (%s): skipped", self, item[1], exc)
            finally:
                self._taken += 1
        if wrote:
            self._guard("flush", self._flush_tool)

    def _named(self, values: Mapping[Any, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, v in values.items():
            tag = self._tags.get(key)
            if tag is None:
                try:
                    tag = self._tags[key] = tag_of(key, self.prefix)
                except (TypeError, ValueError):
                    self.once(f"key {key!r}", "%s: series %r is not a series key", self, key)
                    continue
            try:
                out[tag] = float(v)
            except (TypeError, ValueError):
                self.once(f"value {key!r}", "%s: bad value %r for %r: skipped", self, v, key)
        return out

    def _guard(self, kind: str, fn, *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # the tool's failure is logged once; training goes on
            self.once(kind, "%s: %s failed: %r", self, kind, exc)
            return False
