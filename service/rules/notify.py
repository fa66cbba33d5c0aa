"""Webhook notifications: generic JSON and Slack-compatible payloads, retried with backoff.

Events are queued as ``deliveries`` rows inside the transaction that changed the alert (an
outbox: nothing is sent for a rolled-back ingest); a background thread in each service process
claims due rows, posts them, and records every attempt as its own row. A receiver that hangs
or fails never changes an alert's state.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from logitwatch.service.rules.alertmanager import AlertmanagerSender
from logitwatch.service.rules.alerts import dashboard_link
from logitwatch.service.store.db import WRITE
from logitwatch.service.store.models import utcnow
from logitwatch.service.store.rule_tables import Alert, Delivery
from logitwatch.service.store.worker import Worker

__all__ = ["Notifier", "fired_step", "parse_webhook", "render_payload", "summary_line"]

log = logging.getLogger("logitwatch.service.rules.notify")


def parse_webhook(url: str) -> tuple[str, str]:
    """``(format, url)``: ``slack+https://…`` or a hooks.slack.com URL is Slack, else JSON."""
    if url.startswith("slack+"):
        url, fmt = url.removeprefix("slack+"), "slack"
    else:
        fmt = "slack" if urlsplit(url).hostname == "hooks.slack.com" else "json"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook_urls: {url!r} is not an http(s) URL")
    return fmt, url


def fired_step(alert: dict[str, Any]) -> int | None:
    """The step the alert went firing at; alerts stored before the service recorded it (and
    pending ones) give the step they began."""
    step = alert.get("fired_step")
    return step if step is not None else alert.get("first_step")


def summary_line(alert: dict[str, Any], event: str) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(alert["labels"].items()))
    series = f"{alert['metric']}{{{labels}}}" if labels else alert["metric"]
    head = f"[{event.upper()} {alert['severity']}] {alert['rule']} on run {alert['run']}"
    if event == "resolved":
        return f"{head}: {series} back to normal at step {alert.get('resolved_step')}"
    fired = fired_step(alert)
    began = f" (from step {alert['first_step']})" if alert["first_step"] != fired else ""
    thr = f" (threshold {alert['threshold']})" if alert["threshold"] is not None else ""
    return (
        f"{head}: {series} = {alert['value']}{thr}, firing at step {fired}{began}."
        f" Hint: {alert['hint']}"
    )


def render_payload(
    fmt: str, alert: dict[str, Any], event: str, dashboard_url: str | None
) -> dict[str, Any]:
    line = summary_line(alert, event)
    step = fired_step(alert)
    link = dashboard_link(dashboard_url, alert["run"], step)
    if fmt == "slack":
        text = line if not link else f"{line} <{link}|dashboard at step {step}>"
        return {
            "text": line,
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
        }
    return {
        "source": "logitwatch",
        "event": event,
        "summary": line,
        "fired_step": step,
        "alert": alert,
        "dashboard_url": link,
    }


class Notifier:
    """Sends queued webhook deliveries on a background thread, and hands firing alerts to
    `alertmanager` (its own thread) when one is configured.

    >>> n = Notifier(None, urls=[])  # no URLs: enqueue() queues nothing
    >>> n.enabled
    False
    """

    def __init__(
        self,
        sm: sessionmaker[Session] | None,
        *,
        urls: list[str] | tuple[str, ...] = (),
        dashboard_url: str | None = None,
        timeout_s: float = 5.0,
        max_attempts: int = 5,
        backoff_s: float = 2.0,
        backoff_max_s: float = 300.0,
        poll_s: float = 1.0,
        alertmanager: AlertmanagerSender | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("notify.max_attempts must be at least 1")
        if timeout_s <= 0 or backoff_s < 0 or poll_s <= 0:
            raise ValueError("notify timeouts, backoff and poll interval must be positive")
        self._sm = sm
        self.targets = [parse_webhook(u) for u in urls]
        self.dashboard_url = dashboard_url
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.poll_s = poll_s
        self.alertmanager = alertmanager
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker = Worker(
            "logitwatch-notify", self._loop, self._stop, self._wake, join_s=timeout_s + 5
        )

    @property
    def enabled(self) -> bool:
        return bool(self.targets) or self.alertmanager is not None

    def enqueue(self, session: Session, *, alert: Alert, run: str, event: str) -> None:
        """Queue one delivery per webhook, in the caller's transaction."""
        if self.alertmanager is not None and event == "firing":
            # Resolutions reach Alertmanager through alerts.resolve_alert, silenced or not:
            # once it has an alert, only its end (or endsAt passing) takes it away.
            self.alertmanager.schedule(alert)
        if not self.targets:
            return
        from logitwatch.service.rules.alerts import alert_dict  # alerts imports nothing from here

        data = alert_dict(alert, run)
        for fmt, url in self.targets:
            session.add(
                Delivery(
                    alert_id=alert.id,
                    event=event,
                    url=url,
                    format=fmt,
                    attempt=1,
                    status="queued",
                    payload=render_payload(fmt, data, event, self.dashboard_url),
                    next_at=utcnow(),
                )
            )
        self._wake.set()

    # --- the worker -------------------------------------------------------------------

    def start(self) -> None:
        if self.alertmanager is not None:
            self.alertmanager.start()
        if self.targets and self._sm is not None:
            self._worker.start()

    def close(self) -> None:
        self._worker.close()
        if self.alertmanager is not None:
            self.alertmanager.close()

    def _loop(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                try:
                    sent = self.run_once(client)
                except Exception:  # a database hiccup must not kill the thread
                    log.exception("webhook delivery pass failed")
                    sent = 0
                if not sent:
                    self._wake.wait(self.poll_s)
                    self._wake.clear()

    def _claim(self) -> list[Delivery]:
        """Mark due rows 'sending'; a row another process claimed first is skipped."""
        assert self._sm is not None
        now = utcnow()
        stale = now - timedelta(seconds=self.timeout_s * 2 + 60)
        claimed: list[Delivery] = []
        with self._sm() as session, session.begin():
            session.connection(execution_options={WRITE: True})
            # A process that died mid-send leaves 'sending' rows behind: try them again.
            session.execute(
                update(Delivery)
                .where(Delivery.status == "sending", Delivery.sent_at < stale)
                .values(status="queued")
            )
            ids = session.scalars(
                select(Delivery.id)
                .where(Delivery.status == "queued", Delivery.next_at <= now)
                .order_by(Delivery.next_at, Delivery.id)
                .limit(32)
            ).all()
            for i in ids:
                res = session.execute(
                    update(Delivery)
                    .where(Delivery.id == i, Delivery.status == "queued")
                    .values(status="sending", sent_at=now)
                )
                if res.rowcount == 1:
                    claimed.append(session.get(Delivery, i))
        return claimed

    def run_once(self, client: httpx.Client | None = None) -> int:
        """One pass: send every due delivery once. Returns how many were attempted."""
        batch = self._claim()
        if not batch:
            return 0
        own = client is None
        client = client or httpx.Client(timeout=self.timeout_s)
        try:
            for d in batch:
                code, error = self._post(client, d)
                self._record(d, code, error)
        finally:
            if own:
                client.close()
        return len(batch)

    def _post(self, client: httpx.Client, d: Delivery) -> tuple[int | None, str | None]:
        try:
            resp = client.post(d.url, json=d.payload)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]
        if 200 <= resp.status_code < 300:
            return resp.status_code, None
        return resp.status_code, f"HTTP {resp.status_code}: {resp.text[:200]}"

    def _record(self, d: Delivery, code: int | None, error: str | None) -> None:
        assert self._sm is not None
        now = utcnow()
        with self._sm() as session, session.begin():
            session.connection(execution_options={WRITE: True})
            row = session.get(Delivery, d.id)
            if row is None:  # the alert (and its deliveries) was deleted meanwhile
                return
            row.status = "ok" if error is None else "failed"
            row.status_code = code
            row.error = error
            row.sent_at = now
            if error is not None and row.attempt < self.max_attempts:
                delay = min(self.backoff_s * 2 ** (row.attempt - 1), self.backoff_max_s)
                session.add(
                    Delivery(
                        alert_id=row.alert_id,
                        event=row.event,
                        url=row.url,
                        format=row.format,
                        attempt=row.attempt + 1,
                        status="queued",
                        payload=row.payload,
                        next_at=now + timedelta(seconds=delay),
                    )
                )
        if error is not None:
            log.warning("webhook %s attempt %d failed: %s", d.url, d.attempt, error)
