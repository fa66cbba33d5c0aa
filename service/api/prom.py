"""Prometheus exposition at GET /metrics: the service's own figures, and each active run's latest
values of the catalogue metrics, read from the ``latest`` table (with the runs' unflushed
reports over it, store/latest.py) at scrape time.

Why it is right with several worker processes: run gauges come from the database, which every
process shares, so any worker answers the same. The service's own counters and histograms are
per process by nature; when ``PROMETHEUS_MULTIPROC_DIR`` is set (``logitwatch serve --workers N``
sets it, see :func:`worker_metrics_dir`) they live in prometheus_client's per-process mmap files
and every scrape sums them, with no database write on the request path. Across hosts, Prometheus
scrapes each host, as usual.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.metrics import CATALOGUE, MetricSpec, prometheus_name
from logitwatch.service.settings import Settings
from logitwatch.service.store import reports
from logitwatch.service.store.models import Latest, Run, Series

__all__ = ["LatestCollector", "ServiceMetrics", "install", "worker_metrics_dir"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_DB_OPS = frozenset({"select", "insert", "update", "delete", "copy", "with"})


class ServiceMetrics:
    """The service's own figures, registered in ``registry`` (None: multiprocess files only).

    >>> from prometheus_client import CollectorRegistry
    >>> m = ServiceMetrics(CollectorRegistry())
    >>> m.observe_batch(10_000)
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "logitwatch_http_requests",
            "HTTP requests answered, by route template, method and status code",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "logitwatch_http_request_duration_seconds",
            "time from request to the end of the response, by route template and method",
            ["route", "method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.points = Counter(
            "logitwatch_points_ingested",
            "points stored (a resent duplicate batch is not counted again)",
            registry=registry,
        )
        self.batch_points = Histogram(
            "logitwatch_batch_points",
            "points per ingested batch",
            buckets=(1, 10, 100, 1_000, 10_000, 100_000, 1_000_000),
            registry=registry,
        )
        self.db_seconds = Histogram(
            "logitwatch_db_seconds",
            "time the database took for one statement, by operation",
            ["operation"],
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
            registry=registry,
        )

    def observe_batch(self, n_points: int, *, duplicate: bool = False) -> None:
        if duplicate:
            return
        self.points.inc(n_points)
        self.batch_points.observe(n_points)

    def observe_request(
        self, route: str, method: str, status: int, seconds: float
    ) -> None:  # fmt: skip
        self.requests.labels(route, method, str(status)).inc()
        self.duration.labels(route, method).observe(seconds)


@cache
def _kept_labels(spec: MetricSpec) -> frozenset[str]:
    # Besides `run`: the metric's own catalogue labels (few per run) and the rank under
    # per-rank reporting; per-head labels (prom_drop) and anything a client added are folded.
    return frozenset((*spec.labels, "rank")) - frozenset(spec.prom_drop)


def _max_nan(a: float, b: float) -> float:
    # A NaN in any head is the news: it must not be hidden by max() ordering.
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return a if a >= b else b


#: Series whose gauge labels a LatestCollector keeps at most (then it learns them again).
_MAX_KEYS = 1_000_000
#: New series it looks up by id at most; more (a first scrape), every active one at once.
_LEARN_BY_ID = 500


class LatestCollector:
    """Gauges of the latest value of each catalogue metric of every run seen recently.

    Labels in a metric's ``prom_drop`` (per-head) are folded with max, other labels than the
    catalogue's are dropped, and runs silent longer than ``inactive_after_s`` are left out, so
    the number of series Prometheus sees stays bounded whatever the clients send.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        inactive_after_s: float,
        firing: Callable[[Session], dict[tuple[str, str, str], int]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._inactive_after_s = inactive_after_s
        self._firing = firing
        #: Each series' metric and gauge labels (run, kept labels): a series' run, metric
        #: and labels never change, and decoding 100,000 label sets a scrape cost ~0.5 s.
        self._keys: dict[int, tuple[str, tuple[tuple[str, str], ...]]] = {}

    def describe(self) -> list[Metric]:
        return []  # no database read when the collector is registered

    def _gauge_keys(self, session: Session, sids: list[int], active: Any) -> dict:
        """The metric and gauge labels of series `sids` (of runs matching `active`), learned
        when not known yet: by id when they are few, else every active series in one query.
        Returns the dict that holds them all (a scrape beside this one may start another)."""
        keys = self._keys
        missing = [sid for sid in sids if sid not in keys]
        if not missing:
            return keys
        if len(keys) + len(missing) > _MAX_KEYS:
            keys, missing = {}, sids
        q = select(Series.id, Run.name, Series.metric, Series.labels).join(
            Run, Series.run_id == Run.id
        )
        if len(missing) > _LEARN_BY_ID:
            q = q.where(active, Series.metric.in_(list(CATALOGUE)))
        else:
            q = q.where(Series.id.in_(missing))
        for sid, run, metric, labels in session.execute(q):
            keep = _kept_labels(CATALOGUE[metric])
            kept = {k: str(v) for k, v in (labels or {}).items() if k in keep}
            keys[sid] = (metric, (("run", run), *sorted(kept.items())))
        self._keys = keys
        return keys

    def collect(self) -> Iterator[Metric]:
        cutoff = datetime.now(UTC) - timedelta(seconds=self._inactive_after_s)
        with self._sessions() as session:
            runs = session.execute(
                select(Run.id, Run.name, Run.last_seen_at).where(Run.last_seen_at >= cutoff)
            ).all()
            found = session.execute(
                select(Series.id, Latest.segment, Latest.step, Latest.value)
                .join(Run, Series.run_id == Run.id)
                .outerjoin(Latest, Latest.series_id == Series.id)
                .where(Run.last_seen_at >= cutoff, Series.metric.in_(list(CATALOGUE)))
            ).all()
            keys = self._gauge_keys(session, [r[0] for r in found], Run.last_seen_at >= cutoff)
            # The runs' unflushed reports are newer than their latest rows (latest.py).
            pending = reports.pending_values(session, [r.id for r in runs])
            rows = []
            for sid, segment, step, value in found:
                new = pending.get(sid)
                if new is not None and (segment is None or new[:2] >= (segment, step)):
                    value = new[2]
                elif segment is None:
                    continue  # no point yet
                rows.append((*keys[sid], value))
            # Every run, active or not: "stopped reporting" is itself an alert worth seeing.
            alerts = self._firing(session) if self._firing is not None else {}

        seen = Metric(
            "logitwatch_run_last_seen_timestamp_seconds",
            "Unix time of the last batch from each active run",
            "gauge",
        )
        for r in runs:
            seen.add_sample(seen.name, {"run": r.name}, r.last_seen_at.timestamp())
        yield seen

        folded: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for metric, key, value in rows:
            # SQLite stores a NaN REAL as NULL: read NULL as NaN (see models.Latest).
            v = math.nan if value is None else float(value)
            per_metric = folded.setdefault(metric, {})
            per_metric[key] = _max_nan(per_metric[key], v) if key in per_metric else v
        for metric in sorted(folded):
            spec = CATALOGUE[metric]
            name = prometheus_name(metric)
            help_text = f"latest {spec.help} ({spec.unit})"
            if spec.prom_drop:
                help_text += f", max over {', '.join(spec.prom_drop)}"
            family = Metric(name, help_text, "gauge")
            for key, v in folded[metric].items():
                family.add_sample(name, dict(key), v)
            yield family

        firing = Metric(
            "logitwatch_alerts_firing", "alerts firing now, by run, rule and severity", "gauge"
        )
        for (run, rule, severity), n in sorted(alerts.items()):
            firing.add_sample(firing.name, {"run": run, "rule": rule, "severity": severity}, n)
        yield firing


def _firing_counts() -> Callable[[Session], dict[tuple[str, str, str], int]] | None:
    try:
        from logitwatch.service.rules.alerts import firing_counts
    except ImportError:  # a build without the rules engine
        return None
    return firing_counts


class _RequestMetrics:
    """Pure ASGI middleware (no per-request task or body copy, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: Any, figures: ServiceMetrics) -> None:
        self.app = app
        self.figures = figures

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The route template, never the raw path: labels must stay bounded.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.figures.observe_request(
                route, scope["method"], status, time.perf_counter() - start
            )


def _time_statements(engine: Engine, figures: ServiceMetrics) -> None:
    # Children looked up once: this runs for every statement, on the ingest path.
    children = {op: figures.db_seconds.labels(op) for op in (*sorted(_DB_OPS), "other")}
    other = children["other"]

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany) -> None:
        conn.info.setdefault("lw_stmt_t0", []).append(time.perf_counter())

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany) -> None:
        stack = conn.info.get("lw_stmt_t0")
        if not stack:
            return
        words = statement[:16].split(None, 1)
        op = words[0].lower() if words else ""
        children.get(op, other).observe(time.perf_counter() - stack.pop())


def install(app: FastAPI, settings: Settings, registry: CollectorRegistry | None = None) -> None:
    """Mount GET /metrics and the request-metrics middleware on ``app``.

    ``registry`` defaults to a fresh one (never the global). ``app.state.prom`` is the
    :class:`ServiceMetrics` the routes report batches to.
    """
    # `_created` series double the output and no dashboard reads them (multiprocess mode has none).
    disable_created_metrics()
    mp_dir = os.environ.get(MULTIPROC_ENV)
    if registry is None:
        registry = CollectorRegistry()
    if mp_dir:
        figures = ServiceMetrics(None)  # values go to this process's mmap file
        MultiProcessCollector(registry, path=mp_dir)
    else:
        figures = ServiceMetrics(registry)
    registry.register(
        LatestCollector(
            app.state.sessionmaker,
            inactive_after_s=settings.run_inactive_after_s,
            firing=_firing_counts(),
        )
    )
    _time_statements(app.state.engine, figures)
    app.state.prom = figures
    app.state.registry = registry
    app.add_middleware(_RequestMetrics, figures=figures)

    deps = []
    if settings.auth and settings.metrics_auth:
        from logitwatch.service.api.auth import require

        deps.append(Depends(require("read")))
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", dependencies=deps, include_in_schema=True, response_class=Response)
    def metrics() -> Response:
        """Prometheus text format: service figures and active runs' latest values."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)


@contextmanager
def worker_metrics_dir(workers: int) -> Iterator[str | None]:
    """For ``serve --workers N`` (N > 1): a fresh PROMETHEUS_MULTIPROC_DIR for the workers to
    inherit, removed afterwards. Enter it before uvicorn spawns the workers."""
    if workers <= 1 or os.environ.get(MULTIPROC_ENV):
        yield os.environ.get(MULTIPROC_ENV)
        return
    path = tempfile.mkdtemp(prefix="logitwatch-prom-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)
