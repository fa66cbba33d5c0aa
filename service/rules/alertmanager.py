"""Alertmanager: firing alerts posted to its API v2 and re-sent while they fire, then resolved.

State, not events: an alert row says when Alertmanager is next due to hear of it, and each post
carries the alert as it is then, so a late retry can never re-open what has since resolved.
"""

from __future__ import annotations

import logging
import socket
import threading
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import case, func, literal, null, select, update
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.service.rules.alerts import alert_dict, dashboard_link
from logitwatch.service.store.db import WRITE
from logitwatch.service.store.models import Run, utcnow
from logitwatch.service.store.rule_tables import Alert, Delivery
from logitwatch.service.store.sql import is_pg
from logitwatch.service.store.worker import Worker

__all__ = [
    "AlertmanagerSender",
    "alertmanager_sender",
    "am_alert",
    "check_alertmanager_url",
    "service_url",
]

log = logging.getLogger("logitwatch.service.rules.alertmanager")

_T = Alert.__table__

#: Labels that name the alert itself; a series label of the same name gets a ``series_`` prefix.
RESERVED = ("alertname", "run", "severity", "metric")
#: Alertmanager resolves an alert whose endsAt passes; like Prometheus, firing alerts are
#: posted with endsAt this many resend intervals ahead, so a few lost posts resolve nothing.
ENDS_AFTER_RESENDS = 4


def check_alertmanager_url(url: str) -> str:
    """The base URL without a trailing slash; only http(s) with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    return url.rstrip("/")


def service_url(host: str, port: int) -> str:
    """This service's base URL for links: the bind address, or the host name when it binds all."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def alertmanager_sender(sm: sessionmaker[Session], settings: Any) -> AlertmanagerSender | None:
    """The sender the service's Settings ask for; None without ``alertmanager_url``."""
    if not settings.alertmanager_url:
        return None
    return AlertmanagerSender(
        sm,
        url=settings.alertmanager_url,
        resend_s=settings.alertmanager_resend_s,
        dashboard_url=settings.dashboard_url,
        service=service_url(settings.host, settings.port),
    )


def _rfc3339(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def am_alert(
    alert: dict[str, Any],
    *,
    now: datetime,
    resend_s: float,
    dashboard_url: str | None = None,
    service: str | None = None,
) -> dict[str, Any]:
    """One postable alert of Alertmanager's API v2 for an ``alert_dict``: firing (endsAt ahead)
    unless it has resolved (endsAt its resolve time)."""
    labels = {"alertname": alert["rule"], "run": alert["run"], "severity": alert["severity"]}
    labels["metric"] = alert["metric"]
    for k, v in sorted(alert["labels"].items()):  # layer, head, group, rank: bounded by ingest
        if v != "":  # an empty value is no label to Alertmanager
            labels[f"series_{k}" if k in RESERVED else k] = v
    fired_step = alert["fired_step"] if alert["fired_step"] is not None else alert["first_step"]
    link = dashboard_link(dashboard_url, alert["run"], fired_step)
    series = ",".join(f"{k}={v}" for k, v in sorted(alert["labels"].items()))
    series = f"{alert['metric']}{{{series}}}" if series else alert["metric"]
    summary = f"{alert['rule']} on run {alert['run']}: {series} = {alert['value']}"
    if alert["threshold"] is not None:
        summary += f" (threshold {alert['threshold']})"
    summary += f" at step {fired_step}"
    annotations = {"summary": summary, "hint": alert["hint"], "fired_step": str(fired_step)}
    if link:
        annotations["dashboard"] = link
    started = datetime.fromisoformat(alert["fired_at"] or alert["created_at"])
    if alert["state"] == "resolved":
        annotations["resolved_step"] = str(alert["resolved_step"])
        # Another process's clock may lag: Alertmanager refuses an end before the start.
        ends = max(datetime.fromisoformat(alert["resolved_at"]), started)
    else:
        ends = now + timedelta(seconds=resend_s * ENDS_AFTER_RESENDS)
    api = f"{service}/api/v1/alerts/{alert['id']}" if service else None
    out = {
        "labels": labels,
        "annotations": annotations,
        "startsAt": _rfc3339(started),
        "endsAt": _rfc3339(ends),
    }
    if link or api:
        out["generatorURL"] = link or api
    return out


class AlertmanagerSender:
    """Posts due alerts to Alertmanager on a background thread; every process runs one.

    An alert is due when it fires (``schedule``, in the ingest transaction), when it resolves
    (``alerts.resolve_alert``), every ``resend_s`` while it fires, and after a failed post
    (backoff). A process claims due alerts before posting them, so several processes share
    the work instead of each sending everything.

    >>> AlertmanagerSender(None, url="http://am:9093/").endpoint
    'http://am:9093/api/v2/alerts'
    """

    def __init__(
        self,
        sm: sessionmaker[Session] | None,
        *,
        url: str,
        resend_s: float = 60.0,
        dashboard_url: str | None = None,
        service: str | None = None,
        timeout_s: float = 5.0,
        max_attempts: int = 5,
        backoff_s: float = 2.0,
        backoff_max_s: float = 300.0,
        poll_s: float = 1.0,
        batch: int = 100,
    ) -> None:
        if resend_s <= 0 or timeout_s <= 0 or backoff_s < 0 or poll_s <= 0:
            raise ValueError("alertmanager resend, timeout, backoff and poll must be positive")
        if max_attempts < 1 or batch < 1:
            raise ValueError("alertmanager max_attempts and batch must be at least 1")
        self._sm = sm
        self.url = check_alertmanager_url(url)
        self.endpoint = f"{self.url}/api/v2/alerts"
        self.resend_s = resend_s
        self.dashboard_url = dashboard_url
        self.service = service
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.poll_s = poll_s
        self.batch = batch
        #: A claim outlives one post and its bookkeeping; then another process may take over.
        self.lease_s = timeout_s + 30.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker = Worker(
            "logitwatch-alertmanager", self._loop, self._stop, self._wake, join_s=timeout_s + 5
        )

    def schedule(self, alert: Alert) -> None:
        """Due now (in the caller's transaction): the alert went firing."""
        alert.am_due_at = utcnow()
        self._wake.set()

    # --- the worker -------------------------------------------------------------------

    def start(self) -> None:
        if self._sm is not None:
            self._worker.start()

    def close(self) -> None:
        self._worker.close()

    def _loop(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                wait = self.poll_s
                try:
                    if self.run_once(client):
                        continue  # more may be due: claim the next batch at once
                    # Due but not claimed: an ingest holds the row (PostgreSQL); try again soon.
                    wait = self._until_due(self.poll_s) or min(self.poll_s, 0.1)
                except Exception:  # a database hiccup must not kill the thread
                    log.exception("alertmanager pass failed")
                self._wake.wait(wait)
                self._wake.clear()

    def _until_due(self, most: float) -> float:
        """Seconds until the next alert is due (read-only), at most `most`."""
        assert self._sm is not None
        with self._sm() as session:
            session.connection(execution_options={WRITE: False})
            nxt = session.scalar(select(func.min(Alert.am_due_at)))
        if nxt is None:
            return most
        return min(max((nxt - utcnow()).total_seconds(), 0.0), most)

    def _claim(self) -> list[tuple[int, str, dict[str, Any], bool, int]]:
        """Due alerts, pushed a lease ahead so that no other process posts them meanwhile:
        ``(id, state sent, postable alert, first post of this state, failures so far)``."""
        assert self._sm is not None
        now = utcnow()
        with self._sm() as session, session.begin():
            session.connection(execution_options={WRITE: True})
            q = (
                select(Alert, Run.name)
                .join(Run, Run.id == Alert.run_id)
                .where(Alert.am_due_at <= now)
                .order_by(Alert.am_due_at, Alert.id)
                .limit(self.batch)
            )
            if is_pg(session):
                # Rows another process is claiming, or an ingest is changing, wait for the
                # next pass. SQLite's write transaction already excludes every other writer.
                q = q.with_for_update(of=Alert, skip_locked=True)
            rows = session.execute(q).all()
            if not rows:
                return []
            session.execute(
                update(Alert)
                .where(Alert.id.in_([a.id for a, _ in rows]))
                .values(am_due_at=now + timedelta(seconds=self.lease_s))
            )
            out = []
            for a, run in rows:
                body = am_alert(
                    alert_dict(a, run),
                    now=now,
                    resend_s=self.resend_s,
                    dashboard_url=self.dashboard_url,
                    service=self.service,
                )
                first = a.state == "resolved" or a.am_sent_at is None
                out.append((a.id, a.state, body, first, a.am_failures or 0))
        # Resolutions first: an older episode's end must not land after a newer firing.
        out.sort(key=lambda x: x[1] != "resolved")
        return out

    def run_once(self, client: httpx.Client | None = None) -> int:
        """One post of up to `batch` due alerts. Returns how many were posted."""
        claimed = self._claim()
        if not claimed:
            return 0
        own = client is None
        client = client or httpx.Client(timeout=self.timeout_s)
        try:
            code, error = self._post(client, [body for _, _, body, _, _ in claimed])
        finally:
            if own:
                client.close()
        for item in claimed:
            self._record(item, code, error)
        if error is None:
            log.debug("alertmanager accepted %d alerts", len(claimed))
        else:
            log.warning("alertmanager post of %d alerts failed: %s", len(claimed), error)
        return len(claimed)

    def _post(self, client: httpx.Client, alerts: list[dict]) -> tuple[int | None, str | None]:
        try:
            resp = client.post(self.endpoint, json=alerts)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]
        if 200 <= resp.status_code < 300:
            return resp.status_code, None
        return resp.status_code, f"HTTP {resp.status_code}: {resp.text[:200]}"

    def _record(self, item, code: int | None, error: str | None) -> None:
        """Set the alert's next due time, from its state now (it may have changed meanwhile).

        One short transaction per alert: it never holds one alert's lock while waiting for
        another's, so it cannot deadlock with an ingest that updates several.
        """
        assert self._sm is not None
        alert_id, sent, body, first, failures = item
        now = utcnow()
        if error is None:
            again = None if sent == "resolved" else now + timedelta(seconds=self.resend_s)
            values: dict[str, Any] = {"am_sent_at": now, "am_failures": None}
        else:
            failures += 1
            # Never longer than a resend: a firing alert must reach Alertmanager that soon
            # once it is back, before the endsAt it last heard passes.
            delay = min(self.backoff_s * 2 ** (failures - 1), self.backoff_max_s, self.resend_s)
            again = now + timedelta(seconds=delay)
            if sent == "resolved" and failures >= self.max_attempts:
                again = None  # Alertmanager resolves it itself once the last endsAt passes
            values = {"am_failures": failures}
        stamp = _T.c.am_due_at.type
        # Changed since the claim (it resolved, or it fired again): tell Alertmanager now.
        values["am_due_at"] = case(
            (_T.c.state == sent, null() if again is None else literal(again, stamp)),
            else_=literal(now, stamp),
        )
        with self._sm() as session, session.begin():
            session.connection(execution_options={WRITE: True})
            done = session.execute(update(_T).where(_T.c.id == alert_id).values(**values))
            if done.rowcount != 1:  # deleted meanwhile (with its run)
                return
            # Every post that tells Alertmanager something new, every failure and the success
            # that ends them are kept as delivery rows; routine re-sends of a firing alert not.
            if first or failures:
                session.add(
                    Delivery(
                        alert_id=alert_id,
                        event=sent,
                        url=self.endpoint,
                        format="alertmgr",
                        attempt=failures + (error is None),
                        status="ok" if error is None else "failed",
                        status_code=code,
                        error=error,
                        payload=body,
                        next_at=now,
                        sent_at=now,
                    )
                )
