"""The service's REST API v1 seen from a client: its paths (names quoted) and typed reads.

Used by the agent's poster, the zoo, the ``runs|series|query|alerts`` commands and the demo;
needs only httpx and the standard library.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict
from urllib.parse import quote

import httpx

if TYPE_CHECKING:
    import subprocess

__all__ = [
    "API_PREFIX",
    "HEALTHZ_PATH",
    "READYZ_PATH",
    "Alert",
    "ApiClient",
    "MetricRead",
    "NotReady",
    "Run",
    "SeriesInfo",
    "ServiceError",
    "alert_path",
    "alerts_path",
    "auth_headers",
    "metric_path",
    "points_path",
    "run_path",
    "runs_path",
    "series_path",
]

API_PREFIX = "/api/v1"
READYZ_PATH = "/readyz"
HEALTHZ_PATH = "/healthz"


def _segment(name: str | int) -> str:
    # Valid run and metric names need no escaping; anything else ('/', '?', '#', ' ', '%')
    # must stay inside its path segment so that the service sees, and refuses, the name.
    return quote(str(name), safe="")


def runs_path() -> str:
    return f"{API_PREFIX}/runs"


def run_path(run: str) -> str:
    return f"{API_PREFIX}/runs/{_segment(run)}"


def points_path(run: str) -> str:
    return f"{run_path(run)}/points"


def series_path(run: str) -> str:
    return f"{run_path(run)}/series"


def metric_path(run: str, metric: str) -> str:
    return f"{run_path(run)}/metrics/{_segment(metric)}"


def alerts_path() -> str:
    return f"{API_PREFIX}/alerts"


def alert_path(alert_id: int) -> str:
    return f"{API_PREFIX}/alerts/{_segment(alert_id)}"


def auth_headers(token: str | None) -> dict[str, str]:
    """The Authorization header for a bearer token; none without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


class Run(TypedDict):
    name: str
    config: dict[str, Any]
    tags: Any
    created_at: str
    updated_at: str
    last_seen_at: str | None
    n_series: int
    max_segment: int
    last_step: int | None


class SeriesInfo(TypedDict):
    metric: str
    labels: dict[str, str]
    n_points: int
    first_step: int | None
    last_step: int | None
    last_segment: int | None
    last_value: float | str | None  # non-finite values are 'NaN', 'Infinity', '-Infinity'
    last_time: float | None


class Alert(TypedDict, total=False):
    id: int
    run: str
    rule: str
    severity: str
    state: str
    metric: str
    labels: dict[str, str]
    first_step: int | None
    last_step: int | None
    value: float | str | None
    hint: str | None


class MetricRead(TypedDict):
    """Points of one metric: ``series`` are {labels, segment, steps, values[, times]} (or
    bucket columns with ``max_points``); every page already merged, so next_cursor is None."""

    run: str
    metric: str
    max_points: int | None
    segments: str
    next_cursor: str | None
    series: list[dict[str, Any]]


class ServiceError(Exception):
    """An error answer (``status``, ``path``, ``detail``) or, with status None, no answer."""

    def __init__(
        self, message: str, *, status: int | None = None, path: str = "", detail: Any = None
    ) -> None:
        super().__init__(message)
        self.status, self.path, self.detail = status, path, detail


class NotReady(ServiceError, RuntimeError):
    """/readyz did not answer 200 in time, or the service's process exited first."""


def _detail(r: httpx.Response) -> Any:
    try:
        body = r.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        return r.text[:200]
    if isinstance(detail, list):  # 422: [{field, message}, ...]
        detail = "; ".join(
            f"{d.get('field')}: {d.get('message')}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    return detail


class ApiClient:
    """Reads from a logitwatch service; errors raise ServiceError with one readable line.

    >>> with ApiClient("http://127.0.0.1:8000", token=None) as api:  # doctest: +SKIP
    ...     api.wait_ready(timeout=30)
    ...     [r["name"] for r in api.runs()]
    ...     api.metric("my-run", "loss", max_points=100)["series"]
    ...     api.alerts(run="my-run", state="firing")

    ``client`` is an httpx.Client of the caller's (left open on close, its own timeout
    kept); by default the ApiClient makes one with ``timeout`` and closes it.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = auth_headers(token)
        self._own = client is None
        self.http = client if client is not None else httpx.Client(timeout=timeout)

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        """The absolute URL of an API path (from the *_path functions)."""
        return self.base_url + path

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET a path; its JSON answer. Parameters that are None are left out."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            r = self.http.get(self.url(path), params=query, headers=self.headers)
        except httpx.RequestError as exc:
            what = "cannot reach" if isinstance(exc, httpx.TransportError) else "no answer from"
            raise ServiceError(
                f"{what} the service at {self.base_url} ({exc})", path=path
            ) from None
        if r.status_code >= 400:
            detail = _detail(r)
            where = r.request.url.path
            raise ServiceError(
                f"{r.status_code} from {where}: {detail}",
                status=r.status_code,
                path=where,
                detail=detail,
            )
        try:
            return r.json()
        except ValueError:
            where = r.request.url.path
            raise ServiceError(
                f"{r.status_code} from {where}: the answer is not JSON",
                status=r.status_code,
                path=where,
            ) from None

    def runs(self) -> list[Run]:
        return self.get(runs_path())["runs"]

    def run(self, run: str) -> Run:
        return self.get(run_path(run))

    def series(self, run: str, *, metric: str | None = None) -> list[SeriesInfo]:
        """Each series of the run (of one metric if given) with its count and last point."""
        return self.get(series_path(run), {"metric": metric})["series"]

    def metric(
        self,
        run: str,
        metric: str,
        *,
        labels: Mapping[str, str | None] | None = None,
        start: int | None = None,
        end: int | None = None,
        max_points: int | None = None,
        segments: Literal["newest", "all"] = "newest",
        times: bool = True,
        limit: int | None = None,
    ) -> MetricRead:
        """Points of one metric (label filters such as layer='0'), every page merged."""
        params: dict[str, Any] = {
            "start": start, "end": end, "max_points": max_points, "segments": segments,
            "limit": limit, "times": None if times else "false", **(labels or {}),
        }  # fmt: skip
        merged: dict[str, dict[str, Any]] = {}
        cursor = None
        while True:  # every page; series of one page continue those of the last
            doc = self.get(metric_path(run, metric), {**params, "cursor": cursor})
            for s in doc["series"]:
                key = json.dumps([s["labels"], s["segment"]], sort_keys=True)
                if key not in merged:
                    merged[key] = s
                else:
                    for col, vals in s.items():
                        if isinstance(vals, list):
                            merged[key][col].extend(vals)
            cursor = doc.get("next_cursor")
            if not cursor:
                break
        return {**doc, "next_cursor": None, "series": list(merged.values())}

    def alerts(
        self,
        *,
        run: str | None = None,
        state: str | None = None,
        severity: str | None = None,
        limit: int | None = None,
    ) -> list[Alert]:
        """Alerts newest first; the service returns at most 500 unless ``limit`` says more."""
        params = {"run": run, "state": state, "severity": severity, "limit": limit}
        return self.get(alerts_path(), params)["alerts"]

    def wait_ready(
        self,
        timeout: float = 60.0,
        *,
        process: subprocess.Popen | None = None,
        interval: float = 0.1,
    ) -> dict[str, Any]:
        """Poll /readyz until it answers 200 (its body); NotReady after ``timeout`` seconds,
        or as soon as ``process`` (the service's, when the caller started it) has exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise NotReady(f"the service exited with status {process.returncode}")
            try:
                r = self.http.get(self.url(READYZ_PATH), headers=self.headers, timeout=2)
                if r.status_code == 200:
                    return r.json()
            except (httpx.RequestError, ValueError):
                pass
            time.sleep(interval)
        raise NotReady(f"the service at {self.base_url} did not become ready in {timeout:.0f} s")
