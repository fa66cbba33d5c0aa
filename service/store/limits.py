"""The store's limits: ``LimitError``, and the run-count limit (settings.max_runs) that refuses a
flood of new run names with 422."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from logitwatch.service.store.models import Run
from logitwatch.service.store.sql import cache

__all__ = ["LimitError", "check_run_quota"]


class LimitError(ValueError):
    """A configured limit would be exceeded; `field` names the part of the request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_run_quota(session: Session, *, run: str, max_runs: int) -> None:
    """Raise LimitError when `run` is new and the service already holds `max_runs` runs."""
    if ("run", run) in cache(session):  # known to this process: nothing to count
        return
    if session.scalar(select(Run.id).where(Run.name == run)) is not None:
        return
    have = session.scalar(select(func.count()).select_from(Run)) or 0
    if have >= max_runs:
        raise LimitError("run", f"the service holds {have} runs; the limit is max_runs={max_runs}")
