"""Runs and series: create or update a run, look runs up, list a run's series with their latest
point (the latest table with the run's unflushed reports over it, latest.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from logitwatch.service.store import latest, reports
from logitwatch.service.store.models import Latest, Report, Run, Series, utcnow
from logitwatch.service.store.sql import cache, insert, remember

__all__ = [
    "RunInfo",
    "SeriesInfo",
    "ensure_run_id",
    "get_run",
    "list_runs",
    "list_series",
    "upsert_run",
]


@dataclass(slots=True)
class RunInfo:
    name: str
    config: dict[str, Any]
    tags: Any
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None
    n_series: int
    #: Highest segment stored (-1 when no points yet): a resuming agent opens max_segment+1.
    max_segment: int
    #: Highest step of max_segment (None when no points yet).
    last_step: int | None


@dataclass(slots=True)
class SeriesInfo:
    id: int
    metric: str
    labels: dict[str, str]
    n_points: int
    first_step: int | None
    last_step: int | None
    last_segment: int | None
    last_value: float | None
    last_time: float | None


def ensure_run_id(session: Session, name: str) -> int:
    """The id of run `name`, creating an empty run if it does not exist yet."""
    key = ("run", name)
    run_id = cache(session).get(key)
    if run_id is None:
        run_id = session.scalar(select(Run.id).where(Run.name == name))
        if run_id is None:
            upsert_run(session, name=name)
            run_id = session.scalar(select(Run.id).where(Run.name == name))
        remember(session, {key: run_id})
    return run_id


def upsert_run(
    session: Session, *, name: str, config: dict | None = None, tags: Any = None
) -> bool:
    """Create run `name` or update the config/tags given; True when it was created."""
    now = utcnow()
    created = (
        session.execute(
            insert(session, Run.__table__)
            .values(
                name=name,
                config=config or {},
                tags=tags if tags is not None else {},
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["name"])
            .returning(Run.id)
        ).first()
        is not None
    )
    if not created and (config is not None or tags is not None):
        run = session.scalars(select(Run).where(Run.name == name)).one()
        if config is not None:
            run.config = config
        if tags is not None:
            run.tags = tags
        run.updated_at = now
        session.flush()
    return bool(created)


def _info(session: Session, run: Run) -> RunInfo:
    n_series = session.scalar(select(func.count()).where(Series.run_id == run.id)) or 0
    max_segment = session.scalar(
        select(func.max(Latest.segment)).join(Series).where(Series.run_id == run.id)
    )
    last_step = None
    if max_segment is not None:
        last_step = session.scalar(
            select(func.max(Latest.step))
            .join(Series)
            .where(Series.run_id == run.id, Latest.segment == max_segment)
        )
    # The run's unflushed reports are newer than its latest rows (latest.py).
    pending = session.execute(
        select(Report.segment, func.max(Report.step_max))
        .where(Report.run_id == run.id)
        .group_by(Report.segment)
        .order_by(Report.segment.desc())
        .limit(1)
    ).first()
    if pending is not None and (max_segment is None or tuple(pending) > (max_segment, last_step)):
        max_segment, last_step = pending
    return RunInfo(
        name=run.name,
        config=run.config,
        tags=run.tags,
        created_at=run.created_at,
        updated_at=run.updated_at,
        last_seen_at=run.last_seen_at,
        n_series=n_series,
        max_segment=-1 if max_segment is None else max_segment,
        last_step=last_step,
    )


def get_run(session: Session, *, name: str) -> RunInfo | None:
    run = session.scalars(select(Run).where(Run.name == name)).one_or_none()
    return None if run is None else _info(session, run)


def list_runs(session: Session) -> list[RunInfo]:
    return [_info(session, r) for r in session.scalars(select(Run).order_by(Run.name))]


def list_series(
    session: Session, *, run: str, metric: str | None = None
) -> list[SeriesInfo] | None:
    """The run's series (None if the run does not exist), ordered by metric then labels."""
    run_id = session.scalar(select(Run.id).where(Run.name == run))
    if run_id is None:
        return None
    q = (
        select(Series, Latest)
        .outerjoin(Latest, Latest.series_id == Series.id)
        .where(Series.run_id == run_id)
        .order_by(Series.metric, Series.labels_key)
    )
    if metric is not None:
        q = q.where(Series.metric == metric)
    rows = session.execute(q).all()
    pending = reports.pending_latest(session, [run_id])
    out = []
    for s, lt in rows:
        stored = None
        if lt is not None:
            # SQLite stores NaN as NULL; a latest row always has a value, so NULL is NaN.
            value = math.nan if lt.value is None else lt.value
            stored = latest.Newest(lt.segment, lt.step, value, lt.time, lt.n_points, lt.first_step)
        new = latest.merge(stored, pending.get(s.id))
        out.append(
            SeriesInfo(
                id=s.id,
                metric=s.metric,
                labels=s.labels,
                n_points=new.n_points if new else 0,
                first_step=new.first_step if new else None,
                last_step=new.step if new else None,
                last_segment=new.segment if new else None,
                last_value=new.value if new else None,
                last_time=new.time if new else None,
            )
        )
    return out
