"""The run-count limit (settings.max_runs): a flood of new run names is refused with 422."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import Run
from .store_ingest import LimitError
from .store_sql import cache

__all__ = ["check_run_quota"]


def check_run_quota(session: Session, *, run: str, max_runs: int) -> None:
    """Raise LimitError when `run` is new and the service already holds `max_runs` runs."""
    if ("run", run) in cache(session):  # known to this process: nothing to count
        return
    if session.scalar(select(Run.id).where(Run.name == run)) is not None:
        return
    have = session.scalar(select(func.count()).select_from(Run)) or 0
    if have >= max_runs:
        raise LimitError("run", f"the service holds {have} runs; the limit is max_runs={max_runs}")
