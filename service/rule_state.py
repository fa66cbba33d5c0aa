"""rule_state rows of one run, read and written in bulk inside the ingest transaction.

One row per series (``metric{labels_key}``) holds every rule's memory of it as JSON
(``{"rule": {...}}``); the run's own row (key ``""``) holds trigger steps and absent-rule times.
Core statements, not ORM objects: a batch touches one row per series it carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from logitwatch.service.models import utcnow
from logitwatch.service.models_rules import RuleState

__all__ = ["RUN_KEY", "Points", "StateRow", "StateRows"]

RUN_KEY = ""
_T = RuleState.__table__


@dataclass(slots=True)
class StateRow:
    segment: int
    last_step: int
    state: dict[str, Any]
    new: bool = False
    dirty: bool = False


@dataclass(slots=True)
class Points:
    """A series' new points, in step order, and the last step seen before them."""

    prev: int
    steps: np.ndarray  # int64
    values: np.ndarray  # float64
    row: StateRow


@dataclass
class StateRows:
    session: Session
    run_id: int
    segment: int
    rows: dict[str, StateRow] = field(default_factory=dict)

    def load(self, keys: list[str]) -> None:
        wanted = sorted({*keys, RUN_KEY})
        for i in range(0, len(wanted), 500):
            q = select(_T.c.series_key, _T.c.segment, _T.c.last_step, _T.c.state).where(
                _T.c.run_id == self.run_id, _T.c.series_key.in_(wanted[i : i + 500])
            )
            for key, seg, last, state in self.session.execute(q):
                self.rows[key] = StateRow(seg, last, dict(state or {}))

    def get(self, key: str) -> StateRow:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = StateRow(self.segment, -1, {}, new=True, dirty=True)
        return row

    def run_state(self) -> dict[str, Any]:
        return self.get(RUN_KEY).state

    def save(self) -> None:
        now = utcnow()
        new, old = [], []
        for key, row in self.rows.items():
            if not row.dirty:
                continue
            values = {"segment": row.segment, "last_step": row.last_step, "state": row.state}
            if row.new:
                new.append({"run_id": self.run_id, "series_key": key, "updated_at": now, **values})
            else:
                old.append(
                    {"k_run": self.run_id, "k_key": key, "k_at": now}
                    | {f"k_{k}": v for k, v in values.items()}
                )
        if new:
            self.session.execute(insert(_T), new)
        if old:
            stmt = (
                update(_T)
                .where(_T.c.run_id == bindparam("k_run"), _T.c.series_key == bindparam("k_key"))
                .values(
                    segment=bindparam("k_segment"),
                    last_step=bindparam("k_last_step"),
                    state=bindparam("k_state", type_=_T.c.state.type),
                    updated_at=bindparam("k_at", type_=_T.c.updated_at.type),
                )
            )
            self.session.execute(stmt, old)
