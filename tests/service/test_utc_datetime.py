"""Timestamps come back as aware UTC datetimes on SQLite and PostgreSQL (models.UtcDateTime),
whether the ORM, Core or the driver-level ingest and rule-state statements wrote them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import func, select, text

from logitwatch.protocol import Batch, series_from_columns
from logitwatch.service import store
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.store.models import Batch as BatchRow
from logitwatch.service.store.models import Run, utcnow
from logitwatch.service.store.rule_tables import RuleState, Silence

PLUS_TWO = timezone(timedelta(hours=2))


def _is_utc(t: datetime) -> bool:
    return t.tzinfo is not None and t.utcoffset() == timedelta(0)


def test_aware_and_naive_values_come_back_as_the_same_instant_in_utc(sessions, run_name):
    local = datetime(2031, 5, 6, 12, 30, 15, 250_000, tzinfo=PLUS_TWO)
    naive = datetime(2031, 5, 6, 10, 30, 15, 250_000)  # naive means UTC
    with sessions() as s:
        ids = []
        for until in (local, naive):
            row = Silence(run=run_name, labels={}, until=until, comment="", created_at=utcnow())
            s.add(row)
            s.flush()
            ids.append(row.id)
        s.commit()
    with sessions() as s:
        for until in s.scalars(select(Silence.until).where(Silence.id.in_(ids))):
            assert _is_utc(until) and until == local
        # Compared in SQL too: SQLite compares the stored text, so it must all be UTC.
        utc = datetime(2031, 5, 6, 10, 30, 15, 250_000, tzinfo=UTC)
        where = Silence.id.in_(ids), Silence.until == utc
        n = s.scalar(select(func.count()).select_from(Silence).where(*where))
        assert n == 2


def test_postgresql_answers_in_utc_whatever_the_session_time_zone(sessions, run_name, db_url):
    when = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)
    with sessions() as s:
        s.add(Silence(run=run_name, labels={}, until=when, comment="", created_at=when))
        s.commit()
    with sessions() as s:
        if db_url.startswith("postgresql"):
            s.execute(text("SET TIME ZONE 'Asia/Kolkata'"))  # psycopg then answers in +05:30
        until = s.scalar(select(Silence.until).where(Silence.run == run_name))
        assert _is_utc(until) and until == when
        s.rollback()


def test_rows_written_by_driver_level_sql_read_back_as_utc(sessions, run_name):
    before = utcnow() - timedelta(seconds=1)
    batch = Batch("c", 1, 0, [series_from_columns("loss", {}, [1, 2], [2.0, 1.0])])
    with sessions() as s:
        prepared = store.prepare_batch(batch, postgres=s.get_bind().dialect.name == "postgresql")
        store.ingest_batch(s, run=run_name, batch=batch, prepared=prepared)
        RuleEngine(sessions).on_batch(s, run=run_name, batch=batch, prepared=prepared)
        s.commit()
    after = utcnow() + timedelta(seconds=1)
    with sessions() as s:
        run = s.scalars(select(Run).where(Run.name == run_name)).one()
        received = s.scalar(select(BatchRow.received_at).where(BatchRow.run_id == run.id))
        states = s.scalars(select(RuleState.updated_at).where(RuleState.run_id == run.id)).all()
        stamps = [run.created_at, run.updated_at, run.last_seen_at, received, *states]
        assert states and all(_is_utc(t) and before <= t <= after for t in stamps), stamps
