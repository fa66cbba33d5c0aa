"""A batch through the rules rule by rule, across all its series at once.

Most verdicts of most batches are "no" and change nothing but a growth window: a threshold or
nonfinite rule that no new point reaches, a growth rule none of whose new points holds (one
point or many a series, settling or settled). Those are settled here with a few numpy calls
per rule over every series it selects (the layout, cached per rule set and batch shape); the
rest go through ``BatchJob.run_rule`` one by one, in the order the engine has always used:
series by series, rules gated on another rule's triggers last. A verdict settled here has no
side effect but the window (what ``_one_by_one`` would leave in it, to the entry's segment
and last step), so the order is unchanged. ``run_rule`` itself settles a run of quiet points
of one series in one go where it can (``conditions.fast_path``: thresholds, growth, spikes,
the schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from logitwatch.protocol import Series
from logitwatch.service.rules.conditions import bounds_flat, quiet_many
from logitwatch.service.rules.job import BatchJob, NewPoints
from logitwatch.service.rules.model import Growth, NonFinite, Rule, ScheduleDeviation, Threshold
from logitwatch.service.rules.state import Points
from logitwatch.service.store.ingest import Columns
from logitwatch.service.store.ondemand import OnDemand

__all__ = ["Layout", "evaluate", "layout"]


@dataclass(slots=True, eq=False)
class Layout:
    """Which rules select which series of batches shaped alike (the same series in order)."""

    rules: list[Rule]  # the rule set it was made for
    #: rule_state keys of the series that some per-batch rule selects, and their positions
    #: among the batch's non-empty series.
    keys: list[str]
    pos: list[int]
    at: np.ndarray  # pos as an array
    #: (rule, its index in ``rules``, gated, positions in ``keys`` it selects) per rule.
    selects: list[tuple[Rule, int, bool, np.ndarray]]
    growth: list[str]  # names of the growth rules among them
    absent: list[Rule]
    unique: bool  # no series twice in the batch
    whole: bool  # some per-batch rule selects every series of the batch
    #: Positions of the lr series among the batch's non-empty series (warmup.py reads them).
    lr: list[int]


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
    whole = len(pos) == len(names)
    lr = [i for i, (metric, _, _) in enumerate(names) if metric == "lr"]
    at = np.array(pos, dtype=np.intp)
    return Layout(rules, keys, pos, at, selects, growth, list(absent.values()), unique, whole, lr)


def evaluate(
    job: BatchJob,
    lay: Layout,
    series: Sequence[tuple[Series, Columns]],
    one: Columns | None = None,
) -> None:
    """Every per-batch rule over ``series`` (the layout's, in its order; read by index, so
    an OnDemand list makes only the pairs a rule looks at one by one); ``one``: each series
    has one point, and these are the batch's columns end to end (a report's)."""
    if one is not None and not lay.whole:  # the layout's series of the batch's
        times = one.times[lay.at] if len(one.times) else one.times
        one = Columns(one.steps[lay.at], one.values[lay.at], times)
    columns = OnDemand(len(series), lambda i: series[i][1])
    new = job.points_many(lay.keys, columns, lay.unique, one)
    n = len(new)
    fresh = np.flatnonzero(new.k)
    if not len(fresh):
        return
    cols = bounds_flat(new.values, new.k[fresh])
    at = np.full(n, -1, dtype=np.intp)  # position in `cols`; -1: no new point
    at[fresh] = np.arange(len(fresh))
    remembered: dict[str, list[int]] = {}  # rule -> series whose dict holds its memory
    rows = new.rows
    for i in fresh.tolist():
        for name in rows[i].state:
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
            free = ~np.isin(m, mine) if mine else np.ones(len(m), bool)
            todo = _growth(job, lay, rule, m, free, new, cols.first[at[m]]).tolist()
        else:
            todo = m.tolist()
        slow += [(gated, i, order) for i in todo]
    slow.sort()
    for _, i, order in slow:
        rule, p = lay.rules[order], new[i]
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
    free: np.ndarray,
    new: NewPoints,
    firsts: np.ndarray,
) -> np.ndarray:
    """Move the windows of the series ``m`` whose verdicts are none active, all their points
    at once (``free``: the rule's memory of the series is in its block; ``firsts``: each
    one's first new value); return the series that must go one by one (an active verdict,
    memory in the state dict, a restart near)."""
    c: Growth = rule.condition
    b = job.rows.blocks[rule.name]
    seg = job.batch.segment
    pos = b.slots(lay.keys, m, seg, lay)
    b.renew(pos, seg)
    if not lay.unique:
        return m
    k = new.k[m]
    ends = new.steps[new.off[m] + k - 1]  # each series' last step
    if rule.mute_after_restart and job.restarts.steps:
        mute, prev = rule.mute_after_restart, new.prev
        near = [
            job.restarts.crossed(prev[i] - mute, e)
            for i, e in zip(m.tolist(), ends.tolist(), strict=True)
        ]
        free = free & ~np.array(near, bool)
    start = rule.min_step
    if rule.skip_warmup:
        start = max(start, job.ctx.warmup_steps)
    # A run without warmup judges a settling rule's series only once settled (model.Growth).
    settle = c.settle and job.ctx.warmup_steps == 0
    slow = [m[~free]]
    one = k == 1
    single = free & one
    if single.any():
        ms, ps = m[single], pos[single]
        steps, v = ends[single], firsts[single]
        # Before the start, or not finite: the point changes nothing (conditions._fast_small).
        live = np.isfinite(v) & (steps >= start)
        if not live.all():
            b.touch(ps[~live], seg, steps[~live])
            ms, ps, steps, v = ms[live], ps[live], steps[live], v[live]
        if len(ms):
            slow.append(ms[~b.one(c, ps, steps, np.abs(v), settle, seg)])
    multi = free & ~one
    if multi.any():
        mm, pm, k, last = m[multi], pos[multi], k[multi], ends[multi]
        v, live = new.magnitudes()
        steps = new.steps
        if len(mm) < len(new.k):  # not every series of the batch: theirs only
            at = np.repeat(new.off[mm] - (np.cumsum(k) - k), k) + np.arange(int(k.sum()))
            steps, v, live = steps[at], v[at], live[at]
        if start > 0:
            live = live & (steps >= start)
        kept = k
        if not live.all():
            kept = np.bincount(np.repeat(np.arange(len(mm)), k)[live], minlength=len(mm))
            steps, v = steps[live], v[live]
        some = kept > 0
        if not some.all():
            b.touch(pm[~some], seg, last[~some])
        if some.any():
            ok = b.many(c, pm[some], kept[some], steps, v, settle, seg, last[some])
            slow.append(mm[some][~ok])
    return np.concatenate(slow)


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
