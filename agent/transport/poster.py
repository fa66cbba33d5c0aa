"""One HTTP exchange with the service, classified: delivered, retry later, or give up.

Shared by the sender thread and ``logitwatch sync``; the caller owns the waiting.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from logitwatch.agent.transport.spool import BATCH, RUN
from logitwatch.client import auth_headers, points_path, run_path
from logitwatch.protocol import MSGPACK_CONTENT_TYPE

__all__ = ["Backoff", "Outcome", "Poster", "parse_retry_after"]

log = logging.getLogger("logitwatch.agent")


@dataclass(slots=True)
class Outcome:
    """``ok``: delivered (or a duplicate); ``retry``: keep it and try later; neither: drop it."""

    ok: bool
    retry: bool = False
    retry_after: float | None = None  # seconds the service asked us to wait
    kind: str = ""  # a short name for logging once per kind
    detail: str = ""
    answer: dict[str, Any] = field(default_factory=dict)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class Backoff:
    """Exponential backoff with jitter: the n-th wait is in [d/2, d], d = min(cap, base·2ⁿ)."""

    def __init__(self, initial: float, maximum: float, *, rng: random.Random | None = None):
        self.initial, self.maximum = initial, maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        d = min(self.maximum, self.initial * 2**self.failures)
        self.failures = min(self.failures + 1, 60)
        return d / 2 + self._rng.random() * d / 2

    def reset(self) -> None:
        self.failures = 0


class Poster:
    """Sends spool records (points batches and run registrations) for one run."""

    def __init__(
        self,
        server: str,
        run: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        compression: str = "none",
    ) -> None:
        self.server = server.rstrip("/")
        self.run = run
        self.compression = compression
        headers = {"User-Agent": "logitwatch-agent/0.1", **auth_headers(token)}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        self._run_url = self.server + run_path(run)
        self._points_url = self.server + points_path(run)
        self._registration: bytes | None = None  # the last PUT body: resent if the run vanished

    def close(self) -> None:
        self.client.close()

    def run_info(self) -> dict[str, Any] | None:
        """GET the run (max_segment, last_step); {} when unknown there, None when unreachable."""
        try:
            r = self.client.get(self._run_url, timeout=min(2.0, self.client.timeout.read or 2.0))
        except httpx.HTTPError:
            return None
        if r.status_code == 404:
            return {}
        if r.status_code != 200:
            return None
        try:
            body = r.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def send(self, kind: bytes, data: bytes) -> Outcome:
        if kind == RUN:
            self._registration = data
            return self._request("PUT", self._run_url, data, "application/json")
        if kind != BATCH:
            return Outcome(False, kind="bad record", detail=f"unknown spool record kind {kind!r}")
        out = self._request("POST", self._points_url, data, MSGPACK_CONTENT_TYPE)
        if out.kind == "http 404":
            # The run is not there (never registered, or registered while we were offline
            # against another database): create it, then send the batch again.
            body = self._registration or json.dumps({"config": {}, "tags": {}}).encode()
            put = self._request("PUT", self._run_url, body, "application/json")
            if not put.ok:
                return put
            out = self._request("POST", self._points_url, data, MSGPACK_CONTENT_TYPE)
        return out

    def _request(self, method: str, url: str, body: bytes, content_type: str) -> Outcome:
        headers = {"Content-Type": content_type}
        data = body
        if self.compression == "gzip":
            data = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        try:
            r = self.client.request(method, url, content=data, headers=headers)
            if self.compression == "gzip" and r.status_code in (400, 415):
                # A service (or proxy) that does not take gzip bodies: send plain from now on.
                log.warning(
                    "the service refused a gzip body (%d): sending uncompressed", r.status_code
                )
                self.compression = "none"
                return self._request(method, url, body, content_type)
        except httpx.TimeoutException as exc:
            return Outcome(False, retry=True, kind="timeout", detail=str(exc) or "timed out")
        except httpx.HTTPError as exc:
            return Outcome(
                False, retry=True, kind="unreachable", detail=str(exc) or type(exc).__name__
            )
        code = r.status_code
        if 200 <= code < 300:
            try:
                answer = r.json()
            except ValueError:
                answer = {}
            return Outcome(True, answer=answer if isinstance(answer, dict) else {})
        detail = r.text[:300]
        if code in (429, 503) or code >= 500 or code in (401, 403, 408):
            # Kept on disk and retried: an overloaded or restarting service, or a token
            # that an operator may fix (``logitwatch sync --token`` can upload it later).
            return Outcome(
                False,
                retry=True,
                retry_after=parse_retry_after(r.headers.get("Retry-After")),
                kind=f"http {code}",
                detail=detail,
            )
        return Outcome(False, kind=f"http {code}", detail=detail)
