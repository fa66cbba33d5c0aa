"""Moves a reporting step's buffer to the host and hands it to the sink, off the training thread.

The training thread only starts one copy (non-blocking into pinned memory on CUDA, with an
event); a worker thread waits for the event, turns the numbers into a dict and calls the sink.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from logitwatch.agent.probes.reductions import Slots
from logitwatch.agent.transport.sink import SeriesKey, Sink, series_key

__all__ = ["Reporter"]

log = logging.getLogger("logitwatch.agent")

Block = tuple[int, tuple[SeriesKey, ...]]


class Reporter:
    def __init__(self, sink: Sink, label: dict[str, str], max_pending: int) -> None:
        self.sink, self.label = sink, label
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._ring: list[torch.Tensor] = []  # pinned host buffers, reused round-robin
        self._next = 0
        self._warned: set[str] = set()
        self._alert_callbacks: list[Callable[[dict[str, Any]], None]] = []
        self._alerts_seen: set[Any] = set()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="logitwatch-report", daemon=True)
        self._thread.start()

    def warn_once(self, kind: str, msg: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("logitwatch: " + msg, *args)

    def ship(
        self,
        step: int,
        slots: Slots,
        blocks: list[Block],
        host_values: dict,
        check: tuple[int, list[int]] | None = None,
    ) -> None:
        """Called on the training thread: start the device-to-host copy and queue it.
        ``check`` (under torch.distributed): the slot that must read 1 for the step to be
        delivered, and one per block for that block (values the ranks' reduction vouches for)."""
        n = slots.used
        event = None
        wanted = bool(blocks) or check is not None
        if slots.device.type == "cuda" and wanted:
            if not self._ring or self._ring[0].numel() < n:
                # Ring longer than the queue: a buffer is never rewritten while queued.
                self._ring = [
                    torch.empty(slots.buf.numel(), pin_memory=True)
                    for _ in range(self.queue.maxsize + 2)
                ]
            host = self._ring[self._next % len(self._ring)][:n]
            self._next += 1
            host.copy_(slots.buf[:n], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = slots.buf[:n].clone() if wanted else None
        try:
            self.queue.put_nowait((step, time.time(), blocks, host, event, host_values, check))
        except queue.Full:
            self.dropped += 1
            self.warn_once("full", "the report queue is full (sink too slow?); dropping steps")

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                self._deliver(*item)
            except Exception as e:
                self.warn_once(
                    "deliver", "could not deliver a report (%s: %s)", type(e).__name__, e
                )
            finally:
                self.queue.task_done()

    def _deliver(self, step, t, blocks, host, event, host_values, check) -> None:
        if event is not None:
            event.synchronize()
        flat = host.tolist() if host is not None else []
        if check is not None:
            if flat[check[0]] != 1.0:
                return
            blocks = [b for b, i in zip(blocks, check[1], strict=True) if flat[i] == 1.0]
        pairs = list(host_values.items())
        for start, keys in blocks:
            pairs.extend(zip(keys, flat[start : start + len(keys)], strict=True))
        values: dict[SeriesKey, float] = {}
        nonfinite: float | None = None
        for key, value in pairs:
            if key[0].startswith("_nonfinite"):  # partial counts: loss, logits, gradients
                nonfinite = (nonfinite or 0.0) + value
            else:
                values[key] = value
        if nonfinite is not None:
            values[series_key("nonfinite.count", **self.label)] = nonfinite
        self.sink.log(step, values, time=t)
        if self._alert_callbacks:
            self._notify()

    def on_alert(self, callback: Callable[[dict[str, Any]], None]) -> None:
        self._alert_callbacks.append(callback)

    def _notify(self) -> None:
        for alert in self.sink.firing_alerts():
            ident = alert.get("id", repr(sorted(alert.items(), key=lambda kv: kv[0])))
            if ident in self._alerts_seen:
                continue
            self._alerts_seen.add(ident)
            for callback in self._alert_callbacks:
                try:
                    callback(alert)
                except Exception as e:
                    self.warn_once("alert-callback", "an on_alert callback failed (%s)", e)

    def drain(self, timeout: float | None) -> bool:
        """Wait until every queued report reached the sink; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.queue.all_tasks_done:
            while self.queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.queue.all_tasks_done.wait(left)
        return True

    def stop(self, timeout: float | None) -> None:
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
