"""The vectorised rule path (vector.py) against the plain one: the same randomised batches,
healthy and diverging series (spikes, growth, drops, NaN, restarts, resumes, replays, one-point
and many-point batches, alerts open across batches), fed once as the engine runs them and once
with every verdict taken point by point through ``BatchJob.run_rule``, must leave the same
alerts and the same stored rule state, row for row."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sqlalchemy import text

from logitwatch.protocol import MSGPACK_CONTENT_TYPE, Batch, encode_batch, series_from_columns
from logitwatch.service import store
from logitwatch.service.api.layouts import Layouts
from logitwatch.service.api.routes.points import _decode
from logitwatch.service.rules import job as job_module
from logitwatch.service.rules import vector
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.rules.model import parse_rules
from logitwatch.service.rules.user import put_user_rules
from logitwatch.service.store.db import WRITE, make_engine, make_sessionmaker
from logitwatch.service.store.ondemand import OnDemand
from logitwatch.service.store.sql import is_pg

#: Rules beside the built-in ones, for kinds and corners the built-ins leave out.
EXTRA = [
    {"name": "logit-rise-any", "metric": "attn.logit_max",  # no floor: never quiet by bounds
     "condition": {"kind": "growth", "ratio": 1.5, "over_steps": 10}, "for_steps": 2,
     "hold_steps": 5},
    {"name": "logit-drop", "metric": "attn.logit_max",
     "condition": {"kind": "growth", "ratio": 0.5, "over_steps": 8, "min_value": 5.0,
                   "settle": False}, "min_step": 3},
    {"name": "entropy-drop-any", "metric": "attn.entropy_frac",
     "condition": {"kind": "growth", "ratio": 0.6, "over_steps": 15}, "resolve_margin": 0.1,
     "hold_steps": 4},
    {"name": "loss-zscore", "metric": "loss",
     "condition": {"kind": "zscore", "window": 30, "sigmas": 4, "min_points": 5}},
    {"name": "gn-drift", "metric": "grad.norm",
     "condition": {"kind": "slope", "above": 0.01, "window_steps": 20, "min_points": 4}},
]  # fmt: skip

HEADS = 5


def _values(rng, kind: str, steps: np.ndarray, plan: dict) -> np.ndarray:
    """Healthy values with what the plan puts in: runaways, collapses, spikes, NaN, inf."""
    n = len(steps)
    s = steps.astype(float)
    noise = rng.normal(0, 1, n)
    if kind == "logit":
        head = plan["head"]
        v = 11.0 + 0.3 * noise
        if head == 1:  # runs away from `at`, up to the critical level
            v = np.where(s >= plan["at"], 11.0 * 1.08 ** np.minimum(s - plan["at"], 160), v)
        elif head == 2:  # hops between calm and twice as high
            v = np.where((s // 17) % 3 == 2, 30.0 + noise, 12.0 + noise)
        elif head == 3:  # falls and comes back (the drop rules)
            v = np.where((s // 23) % 4 == 3, 3.0 + 0.1 * noise, 14.0 + noise)
        elif head == 4:  # signs and zeros
            v = (rng.choice([-1.0, 1.0, 0.0], n, p=[0.3, 0.65, 0.05])) * (12 + noise)
    elif kind == "entropy":
        v = np.where((s // 29) % 3 == 1, 0.2 + 0.02 * noise, 0.7 + 0.03 * noise)
    elif kind == "loss":
        v = 4.0 * np.exp(-s / 300) + 0.02 * noise
        v = np.where(rng.random(n) < 0.04, v * rng.uniform(1.5, 4.0, n), v)
    elif kind == "grad":
        v = 1.0 + 0.05 * noise + np.where(s > plan["at"], (s - plan["at"]) * 0.02, 0.0)
        v = np.where(rng.random(n) < 0.04, v * rng.uniform(3.0, 12.0, n), v)
    elif kind == "logz":
        v = 10.0 + s * 0.04 + 0.1 * noise
    elif kind == "update":
        v = 1e-3 * (1 + 0.1 * noise)
        v = np.where(rng.random(n) < 0.03, v * 8, v)
    else:  # lr: the declared schedule or a warmup, and now and then off it
        v = np.minimum(1e-3, 1e-3 * (s + 1) / 10) * np.where(rng.random(n) < 0.05, 1.5, 1.0)
    bad = rng.random(n)
    v = np.where(bad < 0.015, np.nan, v)
    return np.where((bad > 0.015) & (bad < 0.02), rng.choice([np.inf, -np.inf], n), v)


SERIES = [
    *[("attn.logit_max", {"layer": "0", "head": str(h)}, "logit") for h in range(HEADS)],
    *[("attn.entropy_frac", {"layer": str(i)}, "entropy") for i in range(2)],
    ("loss", {}, "loss"),
    ("throughput.tokens_per_s", {}, "update"),  # no per-batch rule: a report's layout skips it
    ("grad.norm", {}, "grad"),
    ("logz.mean", {}, "logz"),
    ("update.ratio", {}, "update"),
    ("lr", {"group": "0"}, "lr"),
]


def batches(seed: int, count: int) -> list[list[Batch]]:
    """Transactions of batches: one-point reports, many-point batches, gaps, a series left
    out, replays of old steps, resumes (a new segment from an earlier step)."""
    rng = np.random.default_rng(seed)
    plan = {"at": int(rng.integers(40, 120))}
    step, segment, seq, out = 0, 0, 0, []
    for _ in range(count):
        tx = []
        for _ in range(1 if rng.random() < 0.8 else int(rng.integers(2, 4))):
            r = rng.random()
            if r < 0.05 and step > 30:  # a resume, back to an earlier step
                segment += 1
                step -= int(rng.integers(5, 30))
            width = 1 if r < 0.55 else int(rng.integers(2, 70))
            series = []
            # Most reports carry every series, as a run's do (their layout is then learned).
            gaps = 0.08 if width > 1 or r < 0.15 else 0.0
            for i, (metric, labels, kind) in enumerate(SERIES):
                if rng.random() < gaps:
                    continue
                k = width if rng.random() < 0.7 else int(rng.integers(1, width + 1))
                lo = step - (int(rng.integers(1, 10)) if rng.random() < 0.05 and step > 10 else 0)
                steps = lo + np.sort(rng.choice(np.arange(width + 3), k, replace=False))
                v = _values(rng, kind, steps, {**plan, "head": i})
                series.append(series_from_columns(metric, labels, steps.tolist(), v.tolist()))
            seq += 1
            tx.append(Batch("c", seq, segment, series))
            step += width + 3
        out.append(tx)
    return out


def _plain(monkeypatch) -> None:
    """Every verdict point by point: no rule settled across series, no shortcut for a series'
    run of points (conditions.fast_path), every growth window through _one_by_one."""

    def growth(job, lay, rule, m, *_):
        b = job.rows.blocks[rule.name]
        b.renew(b.slots(lay.keys, m, job.batch.segment, lay), job.batch.segment)
        return m

    monkeypatch.setattr(vector, "_growth", growth)
    monkeypatch.setattr(vector, "quiet_many", lambda cond, cols, idx, ctx: np.zeros(len(idx), bool))
    monkeypatch.setattr(job_module, "fast_path", lambda *a, **k: False)


def _feed(sm, engine, run: str, txs: list[list[Batch]], layouts: Layouts | None = None) -> int:
    """Store and evaluate; with ``layouts``, each batch as the service decodes it: encoded,
    then read by the run's layout where its last report taught one (OnDemand series and
    columns), with its Prepared (a one-point batch's columns end to end: points_many's
    ``one``). The number of reports (batches of one point a series) read by a layout."""
    reports = 0
    for tx in txs:
        with sm() as s:
            for batch in tx:
                p = None
                if layouts is not None:
                    body = encode_batch(batch)
                    batch, p = layouts.decode(run, body, MSGPACK_CONTENT_TYPE, is_pg(s), _decode)
                    reports += isinstance(p.columns, OnDemand)
                if not store.ingest_batch(s, run=run, batch=batch, prepared=p).duplicate:
                    engine.on_batch(s, run=run, batch=batch, prepared=p)
            s.commit()
    return reports


def _alerts(sm, run: str) -> list[tuple]:
    with sm() as s:
        rows = s.execute(
            text("SELECT a.rule, a.metric, a.labels, a.state, a.segment, a.first_step,"
                 " a.last_step, a.fired_step, a.resolved_step, a.value, a.threshold"
                 " FROM alerts a JOIN runs r ON r.id = a.run_id WHERE r.name = :run"),
            {"run": run},
        ).all()  # fmt: skip
    out = []
    for row in rows:
        labels = row[2] if isinstance(row[2], dict) else json.loads(row[2])
        nums = [None if x is None else ("nan" if math.isnan(x) else x) for x in row[9:]]
        out.append((*row[:2], json.dumps(labels, sort_keys=True), *row[3:9], *nums))
    return sorted(out, key=repr)


def _states(sm, run: str) -> dict[str, tuple]:
    """Every rule_state row of the run; alert ids (which differ between runs) as True and
    the absent rules' wall-clock times left out."""
    with sm() as s:
        rows = s.execute(
            text("SELECT series_key, segment, last_step, state FROM rule_state"
                 " JOIN runs ON runs.id = run_id WHERE runs.name = :run"),
            {"run": run},
        ).all()  # fmt: skip
    out = {}
    for key, seg, last, state in rows:
        state = json.loads(state) if isinstance(state, str) else state
        if key == "":
            for seen in state.get("seen", {}).values():
                seen[0] = 0
        elif not key.startswith("#"):
            state = {r: {k: (True if k == "open" else v) for k, v in st.items()}
                     for r, st in state.items()}  # fmt: skip
        out[key] = (seg, last, json.dumps(state, sort_keys=True))
    return out


@pytest.fixture
def sm(db_url):
    engine = make_engine(db_url)
    maker = make_sessionmaker(engine.execution_options(**{WRITE: True}))
    with maker() as s:
        put_user_rules(s, rules=parse_rules(EXTRA))
        s.commit()
    yield maker
    with maker() as s:
        put_user_rules(s, rules=[])
        s.commit()
    engine.dispose()


CONFIGS = {
    "none": None,  # warmup inferred from the lr series; settling rules settle
    "sgdr": {"schedule": {"kind": "sgdr", "peak_lr": 1e-3, "warmup_steps": 10, "t0": 60}},
    "warm": {"warmup_steps": 25},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("seed", [1, 2])
def test_vectorised_and_plain_paths_agree(sm, run_name, monkeypatch, config, seed):
    txs = batches(seed, 50)
    runs = {"vec": f"{run_name}-vec", "plain": f"{run_name}-plain"}
    for run in runs.values():
        with sm() as s:
            store.upsert_run(s, name=run, config=CONFIGS[config])
            s.commit()
    engines = {"vec": RuleEngine(sm), "plain": RuleEngine(sm)}
    layouts = Layouts()
    reports = 0
    for i, tx in enumerate(txs):  # side by side: what is stored after each transaction
        reports += _feed(sm, engines["vec"], runs["vec"], [tx], layouts)
        with monkeypatch.context() as m:
            _plain(m)
            _feed(sm, engines["plain"], runs["plain"], [tx])
        assert _states(sm, runs["vec"]) == _states(sm, runs["plain"]), f"transaction {i}"
        if i % 10 == 9:
            assert _alerts(sm, runs["vec"]) == _alerts(sm, runs["plain"]), f"transaction {i}"
    vec = _alerts(sm, runs["vec"])
    assert len({a[0] for a in vec}) >= 5  # the batches do diverge, in several ways
    assert vec == _alerts(sm, runs["plain"])
    assert reports > 0  # reports went the way the service reads them
