"""Tables of the rule engine: alerts, per-series rule state, silences, webhook deliveries, user rules."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from logitwatch.service.store.models import Base, BigId, Json, UtcDateTime, utcnow

__all__ = ["OPEN_WHERE", "Alert", "Delivery", "RuleState", "Silence", "UserRules"]

Stamp = UtcDateTime()
#: An alert is open until resolved; at most one open alert per (run, rule, metric, labels).
OPEN_WHERE = "state <> 'resolved'"


class Alert(Base):
    """One episode of a rule holding on one series: pending -> firing -> resolved.

    ``value`` is NULL for NaN on SQLite (SQLite stores a NaN REAL as NULL); read NULL as NaN.
    """

    __tablename__ = "alerts"
    __table_args__ = (
        Index(
            "uq_alerts_open",
            "run_id",
            "rule",
            "metric",
            "labels_key",
            unique=True,
            sqlite_where=text(OPEN_WHERE),
            postgresql_where=text(OPEN_WHERE),
        ),
        Index("ix_alerts_state", "state", "run_id"),
        Index("ix_alerts_am_due", "am_due_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    rule: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(128))
    labels: Mapped[dict[str, str]] = mapped_column(Json, default=dict)
    labels_key: Mapped[str] = mapped_column(String(1200))
    state: Mapped[str] = mapped_column(String(16))
    segment: Mapped[int] = mapped_column(Integer, default=0)
    first_step: Mapped[int] = mapped_column(BigInteger)
    last_step: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float | None] = mapped_column(Double)
    threshold: Mapped[float | None] = mapped_column(Double)
    hint: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)
    fired_at: Mapped[datetime | None] = mapped_column(Stamp)
    resolved_at: Mapped[datetime | None] = mapped_column(Stamp)
    resolved_step: Mapped[int | None] = mapped_column(BigInteger)
    acked_at: Mapped[datetime | None] = mapped_column(Stamp)
    acked_by: Mapped[str | None] = mapped_column(String(128))
    #: The step at which it went firing (NULL while pending, and on rows from before 0004).
    fired_step: Mapped[int | None] = mapped_column(BigInteger)
    #: When Alertmanager is next due to hear of it (NULL: never, or nothing left to tell).
    am_due_at: Mapped[datetime | None] = mapped_column(Stamp)
    #: When Alertmanager last accepted it, and how many posts have failed since.
    am_sent_at: Mapped[datetime | None] = mapped_column(Stamp)
    am_failures: Mapped[int | None] = mapped_column(Integer)


class RuleState(Base):
    """What the rules remember of one series (windows, streaks, open alerts) as one JSON blob:
    ``{"rule name": {...}}``. Every rule sees a series' points once, so ``last_step`` is shared.

    ``series_key`` is ``metric{labels_key}``; the run's own row (key ``""``) holds trigger
    steps for ``preceded_by`` and when each absent rule last saw data; a row keyed ``#rule``
    holds that growth rule's windows of every series of the run as packed arrays
    (rules/windows.py), so a step that only moves windows writes one row per rule.
    """

    __tablename__ = "rule_state"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    series_key: Mapped[str] = mapped_column(String(1400), primary_key=True)
    segment: Mapped[int] = mapped_column(Integer, default=0)
    last_step: Mapped[int] = mapped_column(BigInteger, default=-1)
    state: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    updated_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)


class Silence(Base):
    """Mutes notifications (and the ingest answer) for matching alerts until ``until``."""

    __tablename__ = "silences"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run: Mapped[str | None] = mapped_column(String(128))
    rule: Mapped[str | None] = mapped_column(String(64))
    labels: Mapped[dict[str, str]] = mapped_column(Json, default=dict)
    until: Mapped[datetime] = mapped_column(Stamp)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)


class Delivery(Base):
    """One webhook attempt; a queued row is the outbox entry a notifier thread claims.

    Alertmanager posts (format ``alertmgr``) are recorded here too, never queued: their
    schedule lives on the alert row (``am_due_at``).
    """

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_due", "status", "next_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(8))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    #: queued -> sending -> ok | failed (a failed attempt with retries left queues the next one)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    next_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(Stamp)


class UserRules(Base):
    """The user's rule set (one row, id 1); ``version`` tells every process to reload."""

    __tablename__ = "user_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(Integer, default=1)
    rules: Mapped[list[dict[str, Any]]] = mapped_column(Json, default=list)
    source: Mapped[str] = mapped_column(String(1000), default="api")
    updated_at: Mapped[datetime] = mapped_column(Stamp, default=utcnow)
