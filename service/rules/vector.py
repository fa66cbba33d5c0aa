"""A batch through the rules rule by rule, across all its series at once.

Most verdicts of most batches are "no" and change nothing but a growth window: a threshold or
nonfinite rule that no new point reaches, a growth rule whose new point cannot hold. Those are
settled here with a few numpy calls per rule over every series it selects (the layout, cached
per rule set and batch shape); the rest go through ``BatchJob.run_rule`` one by one, in the
order the engine has always used: series by series, rules gated on another rule's triggers
last. A verdict settled here has no side effect but the window, so the order is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from logitwatch.protocol import Series
from logitwatch.service.rules.conditions import bounds_columns, quiet_many
from logitwatch.service.rules.job import BatchJob
from logitwatch.service.rules.model import Growth, NonFinite, Rule, ScheduleDeviation, Threshold
from logitwatch.service.rules.state import Points
from logitwatch.service.store.ingest import Columns

__all__ = ["Layout", "evaluate", "layout"]


@dataclass(slots=True, eq=False)
class Layout:
    """Which rules select which series of batches shaped alike (the same series in order)."""

    rules: list[Rule]  # the rule set it was made for
    #: rule_state keys of the series that some per-batch rule selects, and their positions
    #: among the batch's non-empty series.
    keys: list[str]
    pos: list[int]
    #: (rule, its index in ``rules``, gated, positions in ``keys`` it selects) per rule.
    selects: list[tuple[Rule, int, bool, np.ndarray]]
    growth: list[str]  # names of the growth rules among them
    absent: list[Rule]
    unique: bool  # no series twice in the batch


def layout(rules: list[Rule], names: list[tuple[str, dict[str, str], str]]) -> Layout | None:
    """The layout of a batch whose non-empty series are ``(metric, labels, labels_key)``;
    None when no rule selects any of them."""
    keys, pos, absent, members = [], [], {}, {}
    for i, (metric, labels, lkey) in enumerate(names):
        hit = [r for r in rules if r.matches(metric, labels)]
        for r in hit:
            if r.condition.kind == "absent":
                absent.setdefault(r.name, r)
        per_batch = [r for r in hit if r.condition.kind != "absent"]
        if per_batch:
            for r in per_batch:
                members.setdefault(r.name, []).append(len(keys))
            keys.append(f"{metric}{{{lkey}}}")
            pos.append(i)
    if not keys and not absent:
        return None
    selects = [
        (r, n, r.preceded_by is not None, np.array(members[r.name], dtype=np.intp))
        for n, r in enumerate(rules)
        if r.name in members
    ]
    growth = [r.name for r, _, _, _ in selects if isinstance(r.condition, Growth)]
    unique = len(set(keys)) == len(keys)
    return Layout(rules, keys, pos, selects, growth, list(absent.values()), unique)


def evaluate(job: BatchJob, lay: Layout, series: list[tuple[Series, Columns]]) -> None:
    """Every per-batch rule over ``series`` (the layout's, in its order)."""
    pts = job.points_many(lay.keys, [c for _, c in series])
    n = len(pts)
    counts = [len(p.values) for p in pts]
    fresh = [i for i, k in enumerate(counts) if k]
    if not fresh:
        return
    cols = bounds_columns([pts[i].values for i in fresh])
    at = np.full(n, -1, dtype=np.intp)  # position in `cols`; -1: no new point
    at[fresh] = np.arange(len(fresh))
    single = [i for i, k in enumerate(counts) if k == 1]
    one = np.zeros(n, bool)
    one[single] = True
    first = np.zeros(n, np.int64)  # the step of each series with one new point
    if single:
        first[single] = np.concatenate([pts[i].steps for i in single])
    remembered: dict[str, list[int]] = {}  # rule -> series whose dict holds its memory
    for i in fresh:
        for name in pts[i].row.state:
            remembered.setdefault(name, []).append(i)
    everyone = len(fresh) == n
    slow: list[tuple[bool, int, int]] = []  # (gated, series, rule index)
    for rule, order, gated, members in lay.selects:
        m = members if everyone else members[at[members] >= 0]
        if not len(m):
            continue
        cond = rule.condition
        mine = remembered.get(rule.name)
        if isinstance(cond, Threshold | NonFinite):
            todo = m[~quiet_many(cond, cols, at[m], job.ctx)].tolist()
            if mine:
                todo = sorted(set(todo) | (set(mine) & set(m.tolist())))
        elif isinstance(cond, ScheduleDeviation) and job.ctx.schedule is None and not mine:
            todo = []  # no schedule declared: nothing to judge, nothing to remember
        elif isinstance(cond, Growth):
            single = one[m]
            if mine:
                single &= ~np.isin(m, mine)
            todo = _growth(job, lay, rule, m, pts, first[m], cols.first[at[m]], single).tolist()
        else:
            todo = m.tolist()
        slow += [(gated, i, order) for i in todo]
    slow.sort()
    for _, i, order in slow:
        rule, p = lay.rules[order], pts[i]
        if p.bounds is None:
            p.bounds = cols.at(int(at[i]))
        if isinstance(rule.condition, Growth):
            _one_by_one(job, rule, series[i][0], p)
        else:
            job.run_rule(rule, series[i][0], p)


def _growth(
    job: BatchJob,
    lay: Layout,
    rule: Rule,
    m: np.ndarray,
    pts: list[Points],
    steps: np.ndarray,
    values: np.ndarray,
    single: np.ndarray,
) -> np.ndarray:
    """Move the windows of the series ``m`` whose one new point (``steps``, ``values``, where
    ``single``) cannot hold; return the series that must go one by one (more points, an
    open alert, settling, a restart near)."""
    c: Growth = rule.condition
    b = job.rows.blocks[rule.name]
    seg = job.batch.segment
    pos = b.slots(lay.keys, m, seg, lay)
    b.renew(pos, seg)
    if not lay.unique:
        return m
    if rule.mute_after_restart and job.restarts.steps:
        mute = rule.mute_after_restart
        single = single & np.array(
            [not job.restarts.crossed(pts[i].prev - mute, int(pts[i].steps[-1])) for i in m]
        )
    mv, pos, steps, v = m[single], pos[single], steps[single], values[single]
    start = rule.min_step
    if rule.skip_warmup:
        start = max(start, job.ctx.warmup_steps)
    # Before the start, or not finite: the point changes nothing (see conditions._fast_small).
    live = np.isfinite(v) & (steps >= start)
    v = np.abs(v)
    ok = live & b.quiet(c, pos, v)
    if c.settle and job.ctx.warmup_steps == 0:
        ok &= b.settled[pos]  # not settled yet: the point that settles it must be found
    b.push(c, pos[ok], steps[ok], v[ok], seg)
    return np.concatenate([m[~single], mv[live & ~ok]])


def _one_by_one(job: BatchJob, rule: Rule, s: Series, p: Points) -> None:
    """A growth rule through ``run_rule``, its window taken out of the block for it and put
    back after unless the rule now remembers more of the series (an alert, a streak)."""
    b = job.rows.blocks[rule.name]
    i = b.index[p.key]
    state = p.row.state
    if rule.name not in state:
        st = b.take(i)
        if st:
            state[rule.name] = st
    job.run_rule(rule, s, p)
    st = state.get(rule.name)
    if st is not None and b.put(i, st, p.row.segment, p.row.last_step):
        del state[rule.name]
