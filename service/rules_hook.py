"""The hook ingest calls into the rule engine; NoRules is the null object until rules are installed."""

from __future__ import annotations

from sqlalchemy.orm import Session

from logitwatch.protocol import Batch

__all__ = ["NoRules"]


class NoRules:
    """Evaluates nothing and reports no alerts.

    >>> NoRules().firing(None, run="r")
    []
    """

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def on_batch(self, session: Session, *, run: str, batch: Batch) -> None:
        return None

    def firing(self, session: Session, *, run: str) -> list[dict]:
        return []
