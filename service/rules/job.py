"""One batch through the rules: each series' new points in step order, rule by rule, with the
alert transitions (pending -> firing -> resolved) and webhook events they cause."""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from logitwatch.protocol import Batch, Series
from logitwatch.service.rules import alerts as al
from logitwatch.service.rules.conditions import (
    RunContext,
    Verdict,
    evaluate,
    fast_path,
    reset_windows,
)
from logitwatch.service.rules.model import Rule
from logitwatch.service.rules.state import Points, StateRows
from logitwatch.service.store.ingest import Columns
from logitwatch.service.store.models import utcnow
from logitwatch.service.store.rule_tables import Alert

__all__ = ["BatchJob", "NewPoints", "Restarts"]

#: Trigger steps kept per rule, for ``preceded_by`` look-ups.
_MAX_TRIGGERS = 8
_NO_STEPS = np.zeros(0, dtype=np.int64)
_NO_VALUES = np.zeros(0, dtype=np.float64)


class Restarts:
    """Scheduled SGDR restarts up to the batch's last step, searched by bisection."""

    def __init__(self, ctx: RunContext, upto: int) -> None:
        self.steps = ctx.restarts(-1, upto)

    def crossed(self, lo: int, hi: int) -> bool:
        """Any restart r with lo < r <= hi."""
        i = bisect.bisect_right(self.steps, lo)
        return i < len(self.steps) and self.steps[i] <= hi

    def last(self, step: int) -> int | None:
        i = bisect.bisect_right(self.steps, step)
        return self.steps[i - 1] if i else None


class NewPoints:
    """The new points of a batch's series (``BatchJob.points_many``): all of them end to end
    (``steps``, ``values``), ``k[i]`` of series i from ``off[i]``; each series' row and the
    last step seen before them. ``self[i]`` is series i's ``Points``, made when asked for:
    most series are judged for all at once and never need one."""

    __slots__ = ("_mag", "_pts", "k", "keys", "off", "prev", "rows", "steps", "values")

    def __init__(self, keys, rows, prev, k, steps, values) -> None:
        self.keys, self.rows, self.prev = keys, rows, prev
        self.k, self.steps, self.values = k, steps, values
        self.off = np.cumsum(k) - k
        self._pts: dict[int, Points] = {}
        self._mag: tuple[np.ndarray, np.ndarray] | None = None

    def magnitudes(self) -> tuple[np.ndarray, np.ndarray]:
        """|values| and which values are finite (the growth rules' look at every point)."""
        if self._mag is None:
            self._mag = (np.abs(self.values), np.isfinite(self.values))
        return self._mag

    def __len__(self) -> int:
        return len(self.k)

    def __getitem__(self, i: int) -> Points:
        p = self._pts.get(i)
        if p is None:
            a, b = int(self.off[i]), int(self.off[i] + self.k[i])
            p = self._pts[i] = Points(
                self.prev[i], self.steps[a:b], self.values[a:b], self.rows[i], self.keys[i]
            )
        return p


class BatchJob:
    """One batch's evaluation: per-series points, rule states, and alert transitions."""

    def __init__(self, engine, session, run_row, batch, ctx, restarts, rows) -> None:
        self.engine = engine
        self.session: Session = session
        self.run = run_row
        self.batch: Batch = batch
        self.ctx: RunContext = ctx
        self.restarts: Restarts = restarts
        self.rows: StateRows = rows
        self.run_state = rows.run_state()
        self._silences = None

    def points(self, key: str, steps: np.ndarray, values: np.ndarray) -> Points:
        """The series' new points in step order, and the step before the first of them.

        `steps` come ascending and unique, a repeated step keeping its last value, as the
        store wrote them (store.ingest.series_columns).
        """
        row = self.rows.get(key)
        seg = self.batch.segment
        if seg < row.segment:
            return Points(-1, _NO_STEPS, _NO_VALUES, row, key)  # a late batch from before a resume
        if seg > row.segment:
            # A resume opened a new segment: steps start over; open alerts stay open.
            for st in row.state.values():
                reset_windows(st)
            row.segment, row.last_step = seg, -1
            self.rows.changed(key)
        prev = row.last_step
        if len(steps) and steps[0] <= prev:  # drop the steps seen before
            i = int(np.searchsorted(steps, prev, side="right"))
            steps, values = steps[i:], values[i:]
        if len(steps):
            row.last_step = int(steps[-1])
        return Points(prev, steps, values, row, key)

    def points_many(
        self, keys: list[str], columns: Sequence, unique: bool = False, one: Columns | None = None
    ) -> NewPoints:
        """``points`` of non-empty series, end to end. The common case, steps that all follow
        the series' last one in its segment, takes no numpy call per series, and for
        ``unique`` keys (none twice) no Python statement per series either. ``one``: the
        series have one point each, and these are their columns end to end (a report's)."""
        if not columns:
            return NewPoints(keys, [], [], np.zeros(0, np.intp), _NO_STEPS, _NO_VALUES)
        if one is not None:
            lens = [1] * len(columns)
            k = np.ones(len(columns), np.intp)
            steps = firsts = lasts = one.steps
        else:
            lens = [len(c.steps) for c in columns]
            k = np.array(lens, np.intp)
            ends = np.cumsum(k)
            steps = np.concatenate([c.steps for c in columns])
            firsts, lasts = steps[ends - k], steps[ends - 1]
        rows, seg = self.rows.rows, self.batch.segment
        got = [rows.get(key) for key in keys]
        if unique and None not in got and [r.segment for r in got].count(seg) == len(got):
            prev = [r.last_step for r in got]
            if (firsts > np.array(prev, np.int64)).all():
                for row, last in zip(got, lasts.tolist(), strict=True):
                    row.last_step = last
                values = (
                    one.values if one is not None else np.concatenate([c.values for c in columns])
                )
                return NewPoints(keys, got, prev, k, steps, values)
        got, prev, odd = [], [], []
        for key, first, last in zip(keys, firsts.tolist(), lasts.tolist(), strict=True):
            row = rows.get(key)
            if row is not None and row.segment == seg and first > row.last_step:
                got.append(row)
                prev.append(row.last_step)
                row.last_step = last
            else:
                odd.append(len(got))
                got.append(None)
                prev.append(None)
        parts = [(c.steps, c.values) for c in columns]
        for i in odd:
            p = self.points(keys[i], columns[i].steps, columns[i].values)
            got[i], prev[i], parts[i] = p.row, p.prev, (p.steps, p.values)
            lens[i] = len(p.steps)
        if odd:
            k = np.array(lens, np.intp)
            steps = np.concatenate([s for s, _ in parts])
        values = np.concatenate([v for _, v in parts])
        return NewPoints(keys, got, prev, k, steps, values)

    def run_rule(self, rule: Rule, s: Series, pts: Points) -> None:
        if not len(pts.steps):
            return
        self.rows.changed(pts.key)
        st: dict[str, Any] = pts.row.state.get(rule.name) or {}
        start = rule.min_step
        if rule.skip_warmup:
            start = max(start, self.ctx.warmup_steps)
        mute = rule.mute_after_restart
        last_step = int(pts.steps[-1])
        near_restart = mute and self.restarts.crossed(pts.prev - mute, last_step)
        if "on" not in st and "open" not in st and not near_restart:
            i0 = int(np.searchsorted(pts.steps, start)) if start > 0 else 0
            try:
                done = fast_path(
                    rule.condition, st, pts.steps[i0:], pts.values[i0:], self.ctx, pts.bounds
                )
            except (TypeError, ValueError):
                reset_windows(st)  # a window left by a rule of this name with another kind
                done = False
            if done:
                self._keep(rule, pts, st)
                return
        last = pts.prev
        for step, value in zip(pts.steps.tolist(), pts.values.tolist(), strict=True):
            if mute and self.restarts.crossed(last, step):
                reset_windows(st)
            last = step
            if step < start:
                continue
            if mute:
                restart = self.restarts.last(step)
                if restart is not None and step < restart + mute:
                    continue
            try:
                verdict = evaluate(rule.condition, st, step, value, self.ctx)
            except (TypeError, ValueError, IndexError):
                # a window left by an earlier rule of this name with another condition kind
                reset_windows(st)
                verdict = evaluate(rule.condition, st, step, value, self.ctx)
            if verdict is not None:
                self._apply(rule, s, st, step, verdict)
        self._keep(rule, pts, st)

    @staticmethod
    def _keep(rule: Rule, pts: Points, st: dict[str, Any]) -> None:
        if st:
            pts.row.state[rule.name] = st
        else:
            pts.row.state.pop(rule.name, None)

    def _triggers(self, rule: str) -> list[int]:
        return self.run_state.setdefault("trig", {}).get(rule, [])

    def _apply(self, rule: Rule, s: Series, st: dict, step: int, v: Verdict) -> None:
        if not v.active and "on" not in st and "open" not in st:
            return  # the common case: nothing holds, nothing was holding
        was_on = bool(st.get("on"))
        st["on"] = v.active
        if v.active and not was_on:
            trig = self.run_state.setdefault("trig", {})
            trig[rule.name] = [*trig.get(rule.name, []), step][-_MAX_TRIGGERS:]
            if rule.preceded_by is not None:
                p = rule.preceded_by
                st["blocked"] = not any(
                    step - p.within_steps <= t < step for t in self._triggers(p.rule)
                )
        active = v.active and not (rule.preceded_by is not None and st.get("blocked"))
        alert = self._alert(st.get("open"))
        if (
            not active
            and alert is not None
            and alert.state == "firing"
            and _held(rule, st, step, v)
        ):
            return  # hysteresis: the episode goes on
        if active:
            st["streak"] = st.get("streak", 0) + 1
            st["last"] = step
            state = "firing" if st["streak"] >= rule.for_steps else "pending"
            if alert is None:
                alert = al.open_alert(
                    self.session, run_id=self.run.id, rule=rule.name, severity=rule.severity,
                    metric=s.metric, labels=s.labels, step=step, segment=self.batch.segment,
                    value=v.value, threshold=v.threshold, hint=rule.hint, state=state,
                )  # fmt: skip
                st["open"] = alert.id
                if state == "firing":
                    self._notify(alert, "firing")
                return
            alert.last_step, alert.value, alert.threshold = step, v.value, v.threshold
            alert.updated_at = utcnow()
            if alert.state == "pending" and state == "firing":
                alert.state, alert.fired_at, alert.fired_step = "firing", utcnow(), step
                self._notify(alert, "firing")
            return
        st.pop("streak", None)
        st.pop("open", None)
        st.pop("last", None)
        if not v.active:
            st.pop("on", None)
            st.pop("blocked", None)
        if alert is None:
            return
        if alert.state == "pending":
            self.session.delete(alert)  # it never fired: like Prometheus, forget it
        else:
            al.resolve_alert(alert, step=step)
            self._notify(alert, "resolved")
        self.session.flush()  # free the (run, rule, series) slot for the next episode

    def _alert(self, alert_id: int | None) -> Alert | None:
        if alert_id is None:
            return None
        alert = self.session.get(Alert, alert_id)
        return alert if alert is not None and alert.state != "resolved" else None

    def _notify(self, alert: Alert, event: str) -> None:
        if not self.engine.notifier.enabled:
            return
        if self._silences is None:
            self._silences = al.active_silences(self.session)
        if not al.is_silenced(self._silences, alert, self.run.name):
            self.engine.notifier.enqueue(self.session, alert=alert, run=self.run.name, event=event)

    def saw_data(self, rule: Rule, upto: int) -> None:
        """An absent rule's data arrived: remember when, and resolve its alert if open."""
        seen = self.run_state.setdefault("seen", {})
        prev = seen.get(rule.name, [0.0, -1])
        seen[rule.name] = [time.time(), max(upto, prev[1])]
        alert = self._alert(self.run_state.setdefault("absent_open", {}).pop(rule.name, None))
        if alert is not None:
            al.resolve_alert(alert, step=upto)
            self._notify(alert, "resolved")


def _held(rule: Rule, st: dict[str, Any], step: int, v: Verdict) -> bool:
    """A firing alert whose condition just failed keeps firing while the value is within the
    rule's resolve margin of the threshold, or until the condition has been clear for
    ``hold_steps`` steps since it last held."""
    measured, threshold = v.measured, v.threshold
    if rule.resolve_margin and threshold is not None and math.isfinite(measured):
        band = rule.resolve_margin * abs(threshold)
        if measured > threshold - band if v.above else measured < threshold + band:
            st["last"] = step
            return True
    return step < st.setdefault("last", step) + rule.hold_steps
