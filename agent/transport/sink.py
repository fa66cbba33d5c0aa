"""Where the Monitor's numbers go: a small sink interface, a null sink and a fan-out.

The Monitor never talks to the network itself; it hands each reporting step to a sink.
``log`` must be cheap and must never block or raise: the HTTP sink queues, the file sink
buffers, the null sink drops: null objects and fan-out, so the Monitor needs no ``if enabled:``.
"""

from __future__ import annotations

import threading
import time as _time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["FanOutSink", "MemorySink", "NullSink", "SeriesKey", "Sink", "series_key"]

#: (metric, sorted label pairs): the identity of one series, e.g.
#: ("attn.logit_max", (("head", "3"), ("layer", "0"))).
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


def series_key(metric: str, **labels: Any) -> SeriesKey:
    """>>> series_key("attn.logit_max", layer=0, head=3)
    ('attn.logit_max', (('head', '3'), ('layer', '0')))
    """
    return metric, tuple(sorted((k, str(v)) for k, v in labels.items()))


class Sink:
    """Base sink and the null object: accepts everything, does nothing."""

    def register_run(
        self,
        run: str,
        *,
        config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Record the run's configuration (PUT /api/v1/runs/{run} for the HTTP sink)."""

    def log(
        self, step: int, values: Mapping[SeriesKey, float], *, time: float | None = None
    ) -> None:
        """Queue one step's values. Must not block, must not raise."""

    def firing_alerts(self) -> list[dict[str, Any]]:
        """The run's firing alerts as last reported by the service (empty offline)."""
        return []

    def alert(self, alert: Mapping[str, Any]) -> None:
        """A newly firing alert, once (W&B and TensorBoard show it). Must not block or raise."""

    #: After close: what could not be delivered (sender.Undelivered), or None when nothing.
    undelivered: Any = None

    def flush(self, timeout: float | None = None) -> bool:
        """Push out what is queued; True if everything was delivered or stored."""
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush and release resources; returns within ``timeout`` whatever happens."""


class NullSink(Sink):
    """Discards everything (monitoring switched off)."""


class MemorySink(Sink):
    """Keeps every logged value in memory: for tests and notebooks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows: list[tuple[int, float, dict[SeriesKey, float]]] = []
        self.runs: dict[str, dict[str, Any]] = {}

    def register_run(self, run, *, config=None, tags=None) -> None:
        self.runs[run] = {"config": dict(config or {}), "tags": dict(tags or {})}

    def log(self, step, values, *, time=None) -> None:
        with self._lock:
            self.rows.append((step, _time.time() if time is None else time, dict(values)))

    def series(self, metric: str, **labels: Any) -> tuple[list[int], list[float]]:
        """Steps and values of one series."""
        key = series_key(metric, **labels)
        with self._lock:
            pts = [(s, v[key]) for s, _, v in self.rows if key in v]
        return [p[0] for p in pts], [p[1] for p in pts]

    def keys(self) -> set[SeriesKey]:
        with self._lock:
            return {k for _, _, v in self.rows for k in v}


class FanOutSink(Sink):
    """Sends everything to several sinks; one failing sink never stops the others."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks: Sequence[Sink] = list(sinks)

    def register_run(self, run, *, config=None, tags=None) -> None:
        for s in self.sinks:
            try:
                s.register_run(run, config=config, tags=tags)
            except Exception:  # a sink must never break training
                pass

    def log(self, step, values, *, time=None) -> None:
        for s in self.sinks:
            try:
                s.log(step, values, time=time)
            except Exception:
                pass

    def firing_alerts(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for s in self.sinks:
            out.extend(s.firing_alerts())
        return out

    def alert(self, alert) -> None:
        for s in self.sinks:
            try:
                s.alert(alert)
            except Exception:
                pass

    @property
    def undelivered(self) -> Any:
        return next((u for s in self.sinks if (u := getattr(s, "undelivered", None))), None)

    def flush(self, timeout=None) -> bool:
        return all([s.flush(timeout) for s in self.sinks])

    def close(self, timeout=None) -> None:
        for s in self.sinks:
            try:
                s.close(timeout)
            except Exception:
                pass
