"""rule_state rows of one run, read and written in bulk inside the ingest transaction.

One row per series (``metric{labels_key}``) holds every rule's memory of it as JSON
(``{"rule": {...}}``); the run's own row (key ``""``) holds trigger steps and absent-rule times.
Driver-level statements (no ORM, no per-row type processing): a batch touches one row per
series it carries, so this is the hot path.

Each process keeps the rows it read or wrote (``RunStates``) between batches, so a batch
reads only its run's own row. That row's ``last_step`` column is the run's rule-state
*epoch*: every transaction that writes any row of the run raises it by one. A cached copy
is used only while the epoch it was saved under is still the stored one, so a write by
another process (or one this process rolled back) makes the next batch read the rows again.
The run's own row is read on every batch, under a row lock on PostgreSQL, never from cache.

A row is written only when its JSON changed (or its segment did). Steps that leave a
series' memory unchanged advance its ``last_step`` in the cache only: a late batch that
repeats them cannot change that memory either, so nothing is lost when it is not stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from logitwatch.service.store.models import utcnow
from logitwatch.service.store.rule_tables import RuleState
from logitwatch.service.store.sql import cache, is_pg, remember

__all__ = ["RUN_KEY", "Points", "RunStates", "StateRow", "StateRows"]

RUN_KEY = ""
_T = RuleState.__table__
#: json.dumps without the check for circular references (states are plain JSON trees): one
#: state row is encoded per series per batch, and the check was a sixth of the cost.
_dumps = json.JSONEncoder(check_circular=False).encode


@dataclass(slots=True)
class StateRow:
    segment: int
    last_step: int
    state: dict[str, Any]
    new: bool = False
    #: Set by the rules when the row changed; save() compares the JSON itself.
    dirty: bool = False
    #: The JSON and segment as stored (None: not stored yet).
    saved: str | None = None
    saved_segment: int = -1


@dataclass(slots=True)
class Points:
    """A series' new points, in step order, and the last step seen before them."""

    prev: int
    steps: np.ndarray  # int64
    values: np.ndarray  # float64
    row: StateRow
    #: Bounds of ``values`` (see conditions.Bounds), set for the whole batch in one go.
    bounds: Any = None


@dataclass(slots=True)
class RunStates:
    """One run's series rows as this process last saw them, valid while ``epoch`` is stored."""

    epoch: int
    rows: dict[str, StateRow]


_RUN = "SELECT last_step, state FROM rule_state WHERE run_id = {p} AND series_key = ''"
_LOAD_KEYS = (
    "SELECT series_key, segment, last_step, state FROM rule_state"
    " WHERE run_id = {p} AND series_key IN ({keys})"
)
_INSERT = (
    "INSERT INTO rule_state (run_id, series_key, segment, last_step, state, updated_at)"
    " VALUES ({p}, {p}, {p}, {p}, {state}, {p})"
)
_UPDATE = (
    "UPDATE rule_state SET segment = {p}, last_step = {p}, state = {state}, updated_at = {p}"
    " WHERE run_id = {p} AND series_key = {p}"
)


_UNNEST = "unnest(%s::text[], %s::int4[], %s::int8[], %s::text[]) AS u(k, seg, last, st)"
_PG_INSERT = (
    "INSERT INTO rule_state (run_id, series_key, segment, last_step, state, updated_at)"
    f" SELECT %s, u.k, u.seg, u.last, CAST(u.st AS JSONB), %s FROM {_UNNEST}"
)
_PG_UPDATE = (
    "UPDATE rule_state SET segment = u.seg, last_step = u.last, state = CAST(u.st AS JSONB),"
    f" updated_at = %s FROM {_UNNEST} WHERE rule_state.run_id = %s AND series_key = u.k"
)


def _columns(rows: list[tuple], *positions: int) -> list[list]:
    """The given columns of `rows`, each as a list (an array parameter)."""
    return [[r[i] for r in rows] for i in positions]


def _cache_key(run_id: int) -> tuple[str, int]:
    return ("rule_state", run_id)


@dataclass
class StateRows:
    session: Session
    run_id: int
    segment: int
    rows: dict[str, StateRow] = field(default_factory=dict)
    epoch: int = 0
    _touched: dict[str, StateRow] = field(default_factory=dict)
    _run_row: StateRow | None = None

    def _sql(self, template: str, **kw: str) -> str:
        if is_pg(self.session):
            return template.format(p="%s", state="CAST(%s AS JSONB)", **kw)
        return template.format(p="?", state="?", **kw)

    def _cursor(self):
        raw = self.session.connection().connection.driver_connection
        return raw.cursor()

    def load(self, keys: list[str]) -> None:
        """Read the run's own row (the epoch), then whichever of `keys` the cache lacks."""
        pg = is_pg(self.session)
        cur = self._cursor()
        try:
            # FOR UPDATE: the absent checker writes this row too (and skips it while locked).
            cur.execute(self._sql(_RUN) + (" FOR UPDATE" if pg else ""), (self.run_id,))
            found = cur.fetchone()
            if found is None:
                self.epoch = 0
            else:
                self.epoch, state = found
                self._run_row = _row(self.segment, -1, state)
            held = _take_cached(self.session, self.run_id)
            if held is not None and held.epoch == self.epoch:
                self.rows = held.rows
            missing = sorted({k for k in keys if k != RUN_KEY and k not in self.rows})
            ph = "%s" if pg else "?"
            for i in range(0, len(missing), 500):
                part = missing[i : i + 500]
                cur.execute(
                    self._sql(_LOAD_KEYS, keys=", ".join([ph] * len(part))), (self.run_id, *part)
                )
                for key, seg, last, state in cur.fetchall():
                    self.rows[key] = _row(seg, last, state)
        finally:
            cur.close()

    def get(self, key: str) -> StateRow:
        if key == RUN_KEY:
            if self._run_row is None:
                self._run_row = StateRow(self.segment, -1, {}, new=True)
            return self._run_row
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = StateRow(self.segment, -1, {}, new=True)
        self._touched[key] = row
        return row

    def run_state(self) -> dict[str, Any]:
        return self.get(RUN_KEY).state

    def save(self) -> None:
        """Write the rows whose JSON (or segment) changed, and the run's row with a new epoch."""
        now = self._stamp()
        new, old = [], []
        for key, row in self._touched.items():
            state = _dumps(row.state)
            if state == row.saved and row.segment == row.saved_segment:
                continue
            if row.new and not row.state:
                continue  # nothing to remember: the cache keeps its last step
            if row.new:
                new.append((self.run_id, key, row.segment, row.last_step, state, now))
            else:
                old.append((row.segment, row.last_step, state, now, self.run_id, key))
            row.new, row.saved, row.saved_segment = False, state, row.segment
        run = self.get(RUN_KEY)
        run_json = _dumps(run.state)
        if new or old or run.new or run_json != run.saved:
            self.epoch += 1
            if run.new:
                new.append((self.run_id, RUN_KEY, 0, self.epoch, run_json, now))
            else:
                old.append((0, self.epoch, run_json, now, self.run_id, RUN_KEY))
        cur = self._cursor()
        try:
            if is_pg(self.session):
                # One statement over arrays each: executemany costs ~20 us of Python a row.
                if new:
                    cur.execute(_PG_INSERT, (self.run_id, now, *_columns(new, 1, 2, 3, 4)))
                if old:
                    cur.execute(_PG_UPDATE, (now, *_columns(old, 5, 0, 1, 2), self.run_id))
            else:
                if new:
                    cur.executemany(self._sql(_INSERT), new)
                if old:
                    cur.executemany(self._sql(_UPDATE), old)
        finally:
            cur.close()
        # The rows join the cache when this transaction commits (never if it rolls back).
        remember(self.session, {_cache_key(self.run_id): RunStates(self.epoch, self.rows)})

    def _stamp(self) -> Any:
        conn = self.session.connection()
        process = _T.c.updated_at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        now = utcnow()
        return process(now) if process is not None else now


def _row(segment: int, last_step: int, state: Any) -> StateRow:
    text = state if isinstance(state, str) else _dumps(state)  # psycopg parses JSONB
    parsed = json.loads(state) if isinstance(state, str) else dict(state or {})
    return StateRow(segment, last_step, parsed or {}, saved=text, saved_segment=segment)


def _take_cached(session: Session, run_id: int) -> RunStates | None:
    """The run's cached rows, removed from the cache while this transaction works on them
    (they come back, updated, when it commits): a rollback leaves no half-changed copy."""
    key = _cache_key(run_id)
    pending = session.info.get("pending")
    held = pending.pop(key, None) if pending else None
    return held if held is not None else cache(session).pop(key, None)
