"""rule_state rows of one run, read and written in bulk inside the ingest transaction.

One row per series (``metric{labels_key}``) holds every rule's memory of it as JSON
(``{"rule": {...}}``); the run's own row (key ``""``) holds trigger steps and absent-rule times.
Driver-level statements (no ORM, no per-row type processing, one JSON encode per changed
row): a batch touches one row per series it carries, on every batch, so this is the hot path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from logitwatch.service.store.models import utcnow
from logitwatch.service.store.rule_tables import RuleState
from logitwatch.service.store.sql import is_pg

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
    #: Bounds of ``values`` (see conditions.Bounds), set for the whole batch in one go.
    bounds: Any = None


_LOAD = "SELECT series_key, segment, last_step, state FROM rule_state WHERE run_id = {p}"
_LOAD_KEYS = _LOAD + " AND series_key IN ({keys})"
_INSERT = (
    "INSERT INTO rule_state (run_id, series_key, segment, last_step, state, updated_at)"
    " VALUES ({p}, {p}, {p}, {p}, {state}, {p})"
)
_UPDATE = (
    "UPDATE rule_state SET segment = {p}, last_step = {p}, state = {state}, updated_at = {p}"
    " WHERE run_id = {p} AND series_key = {p}"
)


@dataclass
class StateRows:
    session: Session
    run_id: int
    segment: int
    rows: dict[str, StateRow] = field(default_factory=dict)

    def _sql(self, template: str, **kw: str) -> str:
        if is_pg(self.session):
            return template.format(p="%s", state="CAST(%s AS JSONB)", **kw)
        return template.format(p="?", state="?", **kw)

    def load(self, keys: list[str]) -> None:
        wanted = sorted({*keys, RUN_KEY})
        conn = self.session.connection()
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            ph = "%s" if is_pg(self.session) else "?"
            sql = self._sql(_LOAD_KEYS, keys=", ".join([ph] * len(part)))
            for key, seg, last, state in conn.exec_driver_sql(sql, (self.run_id, *part)):
                if isinstance(state, str):  # SQLite hands JSON back as text; psycopg parses it
                    state = json.loads(state)
                self.rows[key] = StateRow(seg, last, dict(state or {}))

    def get(self, key: str) -> StateRow:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = StateRow(self.segment, -1, {}, new=True, dirty=True)
        return row

    def run_state(self) -> dict[str, Any]:
        return self.get(RUN_KEY).state

    def save(self) -> None:
        conn = self.session.connection()
        stamp = _T.c.updated_at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        now = utcnow()
        now = stamp(now) if stamp is not None else now
        new, old = [], []
        for key, row in self.rows.items():
            if not row.dirty:
                continue
            state = json.dumps(row.state)
            if row.new:
                new.append((self.run_id, key, row.segment, row.last_step, state, now))
            else:
                old.append((row.segment, row.last_step, state, now, self.run_id, key))
        if new:
            conn.exec_driver_sql(self._sql(_INSERT), new)
        if old:
            conn.exec_driver_sql(self._sql(_UPDATE), old)
