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

A row is written only when the rules touched it (``changed``) and its JSON, or its segment,
differs from what is stored. Steps that leave a series' memory unchanged advance its
``last_step`` in the cache only: a late batch that repeats them cannot change that memory
either, so nothing is lost when it is not stored.

Growth windows live in one row per (run, rule) (windows.py, key ``#rule``), their series keys
in another (``##rule``, written only when an entry is added); a series row read afresh takes
its segment and last step from those entries when they are later than its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from logitwatch.service.rules.windows import (
    FLOAT,
    INT,
    PREFIX,
    GrowthWindows,
    block_key,
    from_b64,
    keys_key,
    to_b64,
)
from logitwatch.service.store.deferred import defer, pg_cursor
from logitwatch.service.store.models import utcnow
from logitwatch.service.store.rule_tables import RuleState
from logitwatch.service.store.sql import cache, is_pg, remember

__all__ = ["RUN_BY_NAME_PG", "RUN_KEY", "UNREAD", "Points", "RunStates", "StateRow", "StateRows"]

RUN_KEY = ""
_T = RuleState.__table__
#: json.dumps without the check for circular references (states are plain JSON trees): one
#: state row is encoded per series per batch, and the check was a sixth of the cost.
_dumps = json.JSONEncoder(check_circular=False).encode
#: Windows of at least this many points are stored packed, as base64 of little-endian arrays:
#: floats as {"f8": ...}, [step, value] pairs as {"i8f8": [steps, values]}. JSON writes each
#: number's repr: a 200-point window cost 40 us a step, a slope rule's 200 pairs 100 us.
_PACK = 16


def _packed(v: list) -> dict[str, Any] | None:
    """A window packed, or None when it is not all floats or all [int, float] pairs."""
    kinds = set(map(type, v))
    if kinds == {float}:
        return {"f8": to_b64(np.array(v), FLOAT)}
    if kinds == {list} and set(map(len, v)) == {2}:
        steps, values = [p[0] for p in v], [p[1] for p in v]
        if set(map(type, steps)) == {int} and set(map(type, values)) == {float}:
            try:
                return {"i8f8": [to_b64(np.array(steps), INT), to_b64(np.array(values), FLOAT)]}
            except OverflowError:  # a step beyond int64
                return None
    return None


def _pack(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its long windows packed (the dicts are copied, never changed)."""
    out = state
    for rule, st in state.items():
        if type(st) is not dict:
            continue
        for k, v in st.items():
            if type(v) is list and len(v) >= _PACK and (packed := _packed(v)) is not None:
                if out is state:
                    out = dict(state)
                if out[rule] is st:
                    out[rule] = dict(st)
                out[rule][k] = packed
    return out


def _unpack(state: dict[str, Any]) -> dict[str, Any]:
    """The windows of a stored state as lists again (a state stored unpacked is unchanged)."""
    for st in state.values():
        if type(st) is dict:
            for k, v in st.items():
                if type(v) is dict and "f8" in v:
                    st[k] = from_b64(v["f8"], FLOAT).tolist()
                elif type(v) is dict and "i8f8" in v:
                    steps, values = (from_b64(v["i8f8"][0], INT), from_b64(v["i8f8"][1], FLOAT))
                    st[k] = [list(p) for p in zip(steps.tolist(), values.tolist(), strict=True)]
    return state


@dataclass(slots=True, eq=False)  # compared by identity: `None in rows` is a hot check
class StateRow:
    segment: int
    last_step: int
    state: dict[str, Any]
    new: bool = False
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
    key: str
    #: Bounds of ``values`` (see conditions.Bounds), set for the whole batch in one go.
    bounds: Any = None


@dataclass(slots=True)
class RunStates:
    """One run's series rows (and growth windows, by rule) as this process last saw them,
    valid while ``epoch`` is stored."""

    epoch: int
    rows: dict[str, StateRow]
    blocks: dict[str, GrowthWindows]


_RUN = "SELECT last_step, state FROM rule_state WHERE run_id = {p} AND series_key = ''"
#: The run's own row, locked, by the run's name: sent in one round trip with the rule
#: engine's lock of the run's row (engine._lock_run), which it follows.
RUN_BY_NAME_PG = (
    "SELECT last_step, state FROM rule_state WHERE series_key = ''"
    " AND run_id = (SELECT id FROM runs WHERE name = %s) FOR UPDATE"
)
#: StateRows.load's default: the run's own row is not read yet.
UNREAD = object()
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


# Binary arrays (%b): the text form of a text array escapes every quote of the JSON with a
# Python regex callback, 2.3 ms a step for a fleet run's rows (measured).
_UNNEST = "unnest(%b::text[], %b::int4[], %b::int8[], %b::text[]) AS u(k, seg, last, st)"
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
    #: Growth windows by rule name (windows.py).
    blocks: dict[str, GrowthWindows] = field(default_factory=dict)
    epoch: int = 0
    _changed: dict[str, StateRow] = field(default_factory=dict)
    _run_row: StateRow | None = None

    def _sql(self, template: str, **kw: str) -> str:
        if is_pg(self.session):
            return template.format(p="%s", state="CAST(%s AS JSONB)", **kw)
        return template.format(p="?", state="?", **kw)

    def _fetch(self, sql: str, params: tuple) -> list[tuple]:
        cur = self._cursor()
        try:
            cur.execute(sql, params)
            return cur.fetchall()
        finally:
            cur.close()

    def _cursor(self):
        if is_pg(self.session):
            return pg_cursor(self.session)  # after the statements deferred before it
        return self.session.connection().connection.driver_connection.cursor()

    def load(self, keys: list[str], blocks: list[str] = (), run_row: Any = UNREAD) -> None:
        """Read the run's own row (the epoch), then whichever of `keys` (series rows) and
        `blocks` (growth rules' windows) the cache lacks. ``run_row``: the run's own row
        (last_step, state), or None, when the caller read it already (RUN_BY_NAME_PG)."""
        pg = is_pg(self.session)
        if run_row is UNREAD:
            # FOR UPDATE: the absent checker writes this row too (and skips it while locked).
            run_row = self._fetch(self._sql(_RUN) + (" FOR UPDATE" if pg else ""), (self.run_id,))
            run_row = run_row[0] if run_row else None
        found = run_row
        if found is None:
            self.epoch = 0
        else:
            self.epoch, state = found
            self._run_row = _row(self.segment, -1, state)
        held = _take_cached(self.session, self.run_id)
        if held is not None and held.epoch == self.epoch:
            self.rows, self.blocks = held.rows, held.blocks
        fresh = sorted({k for k in keys if k != RUN_KEY and k not in self.rows})
        absent = sorted(b for b in blocks if b not in self.blocks)
        missing = fresh + [block_key(b) for b in absent] + [keys_key(b) for b in absent]
        if missing:
            # Only now a cursor: on PostgreSQL it sends the statements deferred so far, and
            # a run whose rows are all cached (the usual report) sends nothing, so a group's
            # writes go in one pipeline, not one per report.
            ph = "%s" if pg else "?"
            stored: dict[str, Any] = {}
            for i in range(0, len(missing), 500):
                part = missing[i : i + 500]
                sql = self._sql(_LOAD_KEYS, keys=", ".join([ph] * len(part)))
                for key, seg, last, state in self._fetch(sql, (self.run_id, *part)):
                    if key.startswith(PREFIX):
                        stored[key] = state
                    else:
                        self.rows[key] = _row(seg, last, state)
            for b in absent:
                if block_key(b) in stored:
                    self.blocks[b] = GrowthWindows.decode(
                        stored[block_key(b)], stored.get(keys_key(b))
                    )
        for b in blocks:
            self.blocks.setdefault(b, GrowthWindows())
        for key in fresh:
            self._catch_up(key)

    def _catch_up(self, key: str) -> None:
        """A row read (or made) afresh: the windows of its growth entries may have seen
        later steps (or a later segment) than the row as stored."""
        row = self.rows.get(key)
        seen = (row.segment, row.last_step) if row is not None else None
        for b in self.blocks.values():
            i = b.index.get(key)
            if i is not None and (seen is None or (b.seg[i], b.last[i]) > seen):
                seen = (int(b.seg[i]), int(b.last[i]))
        if row is None:
            seg, last = seen if seen is not None else (self.segment, -1)
            self.rows[key] = StateRow(seg, last, {}, new=True)
        else:
            row.segment, row.last_step = seen

    def get(self, key: str) -> StateRow:
        if key == RUN_KEY:
            if self._run_row is None:
                self._run_row = StateRow(self.segment, -1, {}, new=True)
            return self._run_row
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = StateRow(self.segment, -1, {}, new=True)
        return row

    def changed(self, key: str) -> None:
        """The rules may have changed this row's memory or segment: save() looks at it."""
        self._changed[key] = self.rows[key]

    def run_state(self) -> dict[str, Any]:
        return self.get(RUN_KEY).state

    def save(self) -> None:
        """Write the changed rows whose JSON (or segment) differs, the changed growth
        windows, and the run's row with a new epoch."""
        now = self._stamp()
        new, old = [], []
        for key, row in self._changed.items():
            state = _dumps(_pack(row.state))
            if state == row.saved and row.segment == row.saved_segment:
                continue
            if row.new and not row.state:
                continue  # nothing to remember: the cache keeps its last step
            if row.new:
                new.append((self.run_id, key, row.segment, row.last_step, state, now))
            else:
                old.append((row.segment, row.last_step, state, now, self.run_id, key))
            row.new, row.saved, row.saved_segment = False, state, row.segment
        for name, b in self.blocks.items():
            if b.dirty:
                state, key = b.encode(), block_key(name)
                if b.new:
                    new.append((self.run_id, key, 0, -1, state, now))
                else:
                    old.append((0, -1, state, now, self.run_id, key))
                keys = b.keys_row()
                if keys is not None:
                    if b.keys_stored < 0:
                        new.append((self.run_id, keys_key(name), 0, -1, keys, now))
                    else:
                        old.append((0, -1, keys, now, self.run_id, keys_key(name)))
                    b.keys_stored = len(b.keys)
                b.new, b.dirty = False, False
        run = self.get(RUN_KEY)
        run_json = _dumps(run.state)
        if new or old or run.new or run_json != run.saved:
            self.epoch += 1
            if run.new:
                new.append((self.run_id, RUN_KEY, 0, self.epoch, run_json, now))
            else:
                old.append((0, self.epoch, run_json, now, self.run_id, RUN_KEY))
        if is_pg(self.session):
            # One statement over arrays each: executemany costs ~20 us of Python a row.
            # Nothing is read back: sent with the transaction's next statement.
            if new:
                defer(self.session, _PG_INSERT, (self.run_id, now, *_columns(new, 1, 2, 3, 4)))
            if old:
                defer(self.session, _PG_UPDATE, (now, *_columns(old, 5, 0, 1, 2), self.run_id))
        else:
            cur = self._cursor()
            try:
                if new:
                    cur.executemany(self._sql(_INSERT), new)
                if old:
                    cur.executemany(self._sql(_UPDATE), old)
            finally:
                cur.close()
        # The rows join the cache when this transaction commits (never if it rolls back).
        remember(
            self.session,
            {_cache_key(self.run_id): RunStates(self.epoch, self.rows, self.blocks)},
        )

    def _stamp(self) -> Any:
        dialect = self.session.get_bind().dialect
        process = _STAMPS.get(dialect.name, False)
        if process is False:
            process = _T.c.updated_at.type.dialect_impl(dialect).bind_processor(dialect)
            _STAMPS[dialect.name] = process
        now = utcnow()
        return process(now) if process is not None else now


#: updated_at's bind processor per dialect (looking it up cost 15 us a batch).
_STAMPS: dict[str, Any] = {}


def _row(segment: int, last_step: int, state: Any) -> StateRow:
    text = state if isinstance(state, str) else _dumps(state)  # psycopg parses JSONB
    parsed = json.loads(state) if isinstance(state, str) else dict(state or {})
    return StateRow(segment, last_step, _unpack(parsed or {}), saved=text, saved_segment=segment)


def _take_cached(session: Session, run_id: int) -> RunStates | None:
    """The run's cached rows, removed from the cache while this transaction works on them
    (they come back, updated, when it commits): a rollback leaves no half-changed copy."""
    key = _cache_key(run_id)
    pending = session.info.get("pending")
    held = pending.pop(key, None) if pending else None
    return held if held is not None else cache(session).pop(key, None)
