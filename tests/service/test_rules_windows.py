"""Growth windows kept per (run, rule) as arrays, and packed float windows in state rows:
the same verdicts and windows as the per-series state dicts, across processes and rollbacks."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from helpers.feed import S, alerts
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from logitwatch.protocol import Batch
from logitwatch.service.rules.conditions import RunContext, _growth_quiet, _median, evaluate
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.rules.model import Growth, parse_rules
from logitwatch.service.rules.state import _pack, _unpack
from logitwatch.service.rules.windows import FLOAT, INT, GrowthWindows, to_b64
from logitwatch.service.store import ingest_batch
from logitwatch.service.store.db import WRITE, make_engine, make_sessionmaker

WARM = RunContext(warmup_steps=1, warmup_declared=True)


def cond(**c):
    return parse_rules([{"name": "r", "metric": "m", "condition": c}])[0].condition


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.floats(0.0, 60.0), min_size=1, max_size=90), min_size=1, max_size=5),
    st.sampled_from([2.0, 0.5]),
    st.integers(1, 3),
)
def test_pushing_a_point_per_series_moves_each_window_as_growth_does(series, ratio, gap):
    c = cond(kind="growth", ratio=ratio, over_steps=20, min_value=20.0)
    b = GrowthWindows()
    keys = [f"m{{i={i}}}" for i in range(len(series))]
    dicts: list[dict] = [{} for _ in series]
    for t in range(max(len(v) for v in series)):
        live = [i for i, v in enumerate(series) if t < len(v)]
        m = np.array(live, dtype=np.intp)
        pos = b.slots(keys, m, 0, None)
        vals = np.array([series[i][t] for i in live])
        quiet = b.quiet(c, pos, vals).tolist()
        for q, i in zip(quiet, live, strict=True):
            assert q == _growth_quiet(c, dicts[i], series[i][t], WARM)
            evaluate(c, dicts[i], t * gap, series[i][t], WARM)
        b.push(c, pos, np.full(len(live), t * gap, np.int64), vals, 0)
        for i in live:
            got = b.take(b.index[keys[i]])
            assert got == {k: v for k, v in dicts[i].items() if k in ("ws", "w")}
            assert b.put(b.index[keys[i]], got, 0, t * gap)
    again = GrowthWindows.decode(b.encode(), b.keys_row())
    for i, k in enumerate(keys):
        assert again.take(again.index[k]) == {k2: v for k2, v in dicts[i].items()}


def test_a_state_the_block_cannot_hold_stays_in_the_dict():
    b = GrowthWindows()
    (i,) = b.slots(["m{}"], np.array([0]), 0, None)
    assert not b.put(i, {"ws": [1], "w": [2.0], "open": 7}, 0, 1)
    assert not b.put(i, {"ws": [1, 2], "w": [2.0]}, 0, 2)
    assert b.put(i, {"ws": [1], "w": [2.0], "settled": True, "from": 0}, 0, 1)
    assert b.take(i) == {"ws": [1], "w": [2.0], "from": 0, "settled": True}


def test_long_float_windows_are_packed_and_old_rows_still_load():
    w = [0.1 * i for i in range(40)]
    pairs = [[i, 0.5 * i] for i in range(30)]
    state = {
        "loss-spike": {"w": w, "on": True},
        "logz-drift": {"w": pairs},
        "short": {"w": w[:3]},
        "mixed": {"w": [1.0, 2] * 10, "ws": [[1, 2]] * 20},
    }
    packed = _pack(state)
    assert state["loss-spike"]["w"] is w and state["logz-drift"]["w"] is pairs  # unchanged
    assert set(packed["loss-spike"]["w"]) == {"f8"} and set(packed["logz-drift"]["w"]) == {"i8f8"}
    assert packed["short"] is state["short"] and packed["mixed"] is state["mixed"]
    assert _unpack(json.loads(json.dumps(packed))) == state
    assert _unpack(json.loads(json.dumps(state))) == state  # stored before packing


# --- the engine: two processes, rollbacks, old rows ------------------------------------


def _batch(seq: int, step: int, logits: list[float]) -> Batch:
    heads = [S("attn.logit_max", [step], [v], layer="0", head=str(h)) for h, v in enumerate(logits)]
    return Batch("c", seq, 0, [S("loss", [step], [2.0]), *heads])


def _logits(step: int) -> list[float]:
    """Four heads: steady, noisy, one that runs away from step 70, one NaN at 40."""
    noisy = 10.0 + (step * 7919 % 13) * 0.3
    run = 12.0 if step < 70 else 12.0 * 1.05 ** (step - 70)
    return [11.0, noisy, run, float("nan") if step == 40 else 9.0]


def _send(sm, engine, run, batch, commit=True):
    with sm() as s:
        if not ingest_batch(s, run=run, batch=batch).duplicate:
            engine.on_batch(s, run=run, batch=batch)
        if commit:
            s.commit()


def _judged(sm, run):
    return sorted((a["rule"], a["state"], a["first_step"], a["labels"].get("head", ""))
                  for a in alerts(sm, run))  # fmt: skip


def _states(sm, run):
    with sm() as s:
        rows = s.execute(
            text("SELECT series_key, state FROM rule_state JOIN runs ON runs.id = run_id"
                 " WHERE runs.name = :run AND series_key <> ''"),
            {"run": run},
        ).all()  # fmt: skip
    out = {}
    for key, state in rows:
        state = json.loads(state) if isinstance(state, str) else state
        if not key.startswith("#"):  # a series row: open alerts' ids differ from run to run
            state = {r: {k: v for k, v in st.items() if k != "open"} for r, st in state.items()}
        out[key] = state
    return out


@pytest.fixture
def sms(db_url):
    made = [make_engine(db_url) for _ in range(2)]
    yield [make_sessionmaker(e.execution_options(**{WRITE: True})) for e in made]
    for e in made:
        e.dispose()


def test_growth_windows_shared_by_processes_and_rolled_back(sms, run_name):
    one = RuleEngine(sms[0])
    pair = [RuleEngine(sm) for sm in sms]
    flaky = RuleEngine(sms[0])
    for step in range(120):
        batch = _batch(step + 1, step, _logits(step))
        _send(sms[0], one, f"{run_name}-one", batch)
        _send(sms[step % 2], pair[step % 2], f"{run_name}-two", batch)
        if step % 7 == 3:
            _send(sms[0], flaky, f"{run_name}-three", batch, commit=False)
        _send(sms[0], flaky, f"{run_name}-three", batch)
    judged = _judged(sms[0], f"{run_name}-one")
    assert {("attn-logit-runaway", "2"), ("attn-logit-growth", "2")} <= {
        (r, h) for r, _, _, h in judged
    }
    for other in ("two", "three"):
        assert _judged(sms[0], f"{run_name}-{other}") == judged
        assert _states(sms[0], f"{run_name}-{other}") == _states(sms[0], f"{run_name}-one")


def test_blocks_stored_with_their_keys_inside_carry_on_and_get_a_keys_row(sms, run_name):
    """A block stored by the last round (its keys inside, no keys row) is judged on from as
    the same run never stored that way, and its next save writes the keys row."""
    engine = RuleEngine(sms[0])
    for step in range(120):
        batch = _batch(step + 1, step, _logits(step))
        _send(sms[0], engine, f"{run_name}-one", batch)
        _send(sms[0], engine, f"{run_name}-old", batch)
        if step == 59:  # the old run's blocks as the last round stored them
            with sms[0]() as s:
                rows = s.execute(
                    text("SELECT r.id, series_key, state FROM rule_state JOIN runs r"
                         " ON r.id = run_id WHERE r.name = :n AND series_key LIKE '#%'"),
                    {"n": f"{run_name}-old"},
                ).all()  # fmt: skip
                got = {k: json.loads(v) if isinstance(v, str) else v for _, k, v in rows}
                run_id = rows[0][0]
                for key, block in got.items():
                    if key.startswith("##"):
                        continue
                    old = {k: v for k, v in block.items() if k != "n"}
                    old["keys"] = got["#" + key]
                    s.execute(text("UPDATE rule_state SET state = :st WHERE run_id = :r AND"
                                   " series_key = :k"),
                              {"st": json.dumps(old), "r": run_id, "k": key})  # fmt: skip
                s.execute(text("DELETE FROM rule_state WHERE run_id = :r AND series_key LIKE"
                               " '##%'"), {"r": run_id})  # fmt: skip
                s.execute(text("UPDATE rule_state SET last_step = last_step + 1"
                               " WHERE run_id = :r AND series_key = ''"), {"r": run_id})  # fmt: skip
                s.commit()
            engine = RuleEngine(sms[0])  # nothing cached: both runs read afresh
    assert _judged(sms[0], f"{run_name}-old") == _judged(sms[0], f"{run_name}-one")
    states = _states(sms[0], f"{run_name}-old")
    assert states == _states(sms[0], f"{run_name}-one")
    blocks = [k for k in states if k.startswith("#") and not k.startswith("##")]
    assert blocks
    assert all("keys" not in states[k] and len(states["#" + k]) == states[k]["n"] for k in blocks)


def test_windows_stored_per_series_by_an_earlier_version_carry_on(sms, run_name):
    """A series row holding its growth window as lists (as stored before the blocks) is
    judged on from that window, and the window moves into the block."""
    engine = RuleEngine(sms[0])
    for step in range(30):
        _send(sms[0], engine, run_name, _batch(step + 1, step, [11.0, 11.0, 11.0, 11.0]))
    with sms[0]() as s:
        run_id = s.execute(text("SELECT id FROM runs WHERE name = :n"), {"n": run_name}).scalar()
        s.execute(text("DELETE FROM rule_state WHERE run_id = :r AND series_key LIKE '#%'"),
                  {"r": run_id})  # fmt: skip
        key = "attn.logit_max{head=2,layer=0}"
        old = {"attn-logit-runaway": {"ws": [29], "w": [30.0]}}
        s.execute(
            text("UPDATE rule_state SET state = :st, last_step = 29"
                 " WHERE run_id = :r AND series_key = :k"),
            {"st": json.dumps(old), "r": run_id, "k": key},
        ) if s.execute(text("SELECT 1 FROM rule_state WHERE run_id = :r AND series_key = :k"),
                       {"r": run_id, "k": key}).first() else s.execute(
            text("INSERT INTO rule_state (run_id, series_key, segment, last_step, state,"
                 " updated_at) VALUES (:r, :k, 0, 29, :st, CURRENT_TIMESTAMP)"),
            {"st": json.dumps(old), "r": run_id, "k": key},
        )  # fmt: skip
        s.execute(text("UPDATE rule_state SET last_step = last_step + 1"
                       " WHERE run_id = :r AND series_key = ''"), {"r": run_id})  # fmt: skip
        s.commit()
    fresh = RuleEngine(sms[1])  # another process: reads the rows afresh
    # Judged against the old window's 30 (limit 60), not the block's 11 (limit 2 x 25)
    _send(sms[1], fresh, run_name, _batch(31, 30, [11.0, 11.0, 55.0, 11.0]))
    _send(sms[1], fresh, run_name, _batch(32, 31, [11.0, 11.0, 61.0, 11.0]))
    judged = _judged(sms[1], run_name)
    assert [j for j in judged if j[0] == "attn-logit-runaway"] == [
        ("attn-logit-runaway", "firing", 31, "2")
    ]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6) | st.sampled_from([0.0, -0.0, 1.5]), min_size=1, max_size=60))
def test_the_spike_rules_median_is_statistics_median(xs):
    assert _median(np.array(xs)) == statistics.median(xs)


def test_entries_that_agree_are_stored_as_one_number_and_old_blocks_still_load():
    b = GrowthWindows()
    keys = [f"m{{i={i}}}" for i in range(3)]
    pos = b.slots(keys, np.arange(3), 2, None)
    b.push(
        Growth(kind="growth", ratio=2.0, over_steps=50), pos, np.full(3, 7, np.int64), np.ones(3), 2
    )
    b.cnt[2] = 0  # one entry empties: its count differs
    d = json.loads(b.encode())
    assert (d["seg"], d["last"], d["from"], d["settled"]) == (2, 7, -1, 0)
    assert isinstance(d["cnt1"], str)  # not all equal: an array (of bytes)
    # as an earlier version stored it: the keys inside, every array as base64 of int64 or
    # float64, the window points' steps as they are
    valid = np.arange(b.ws.shape[1]) < b.cnt[:, None]
    old = {"keys": keys, "ws": to_b64(b.ws[valid], INT), "w": to_b64(b.w[valid], FLOAT)}
    for k, a, t in (("seg", b.seg, INT), ("last", b.last, INT), ("cnt", b.cnt, INT),
                    ("from", b.frm, INT), ("settled", b.settled, np.dtype("u1"))):  # fmt: skip
        old[k] = to_b64(a, t)
    names = ("seg", "last", "cnt", "frm", "settled")
    want = {name: getattr(b, name).tolist() for name in names}
    window = b.take(b.index[keys[0]])
    assert window == {"ws": [7], "w": [1.0]}
    saved_keys = b.keys_row()
    assert json.loads(saved_keys) == keys
    b.keys_stored = 3  # as saved: the row is rewritten only when an entry is added
    assert b.keys_row() is None
    b.slots([*keys, "m{i=3}"], np.array([3]), 2, None)
    assert json.loads(b.keys_row()) == [*keys, "m{i=3}"]
    for stored, keys_row in ((json.dumps(d), saved_keys), (json.dumps(old), None)):
        again = GrowthWindows.decode(stored, keys_row)
        assert {name: getattr(again, name).tolist() for name in names} == want
        assert again.take(again.index[keys[0]]) == window


@pytest.mark.parametrize(
    ("behind", "field"),  # how far the last entry's last step is past its window's last point
    [(251, "ws1"), (252, "ws2"), (65_531, "ws2"), (65_532, "ws4"), (-1, "ws")],
)
@pytest.mark.parametrize(
    ("values", "wfield"),
    [([1.5, 0.25, 2.0**127], "w4"), ([1.5, 0.1, 3.0], "w"), ([1.5, 2.0, 1e300], "w")],
)
def test_window_points_are_stored_as_small_as_they_come_back_exactly(behind, field, values, wfield):
    """Each point's step as its distance behind its entry's last step, in the fewest bytes
    that hold every one (the steps themselves when one is ahead of it), and the values as
    float32 only when each one is a float32."""
    b = GrowthWindows()
    keys, steps = ["a{}", "b{}", "c{}"], [5, 9, 300]
    pos = b.slots(keys, np.arange(3), 0, None)
    for i, (step, value) in enumerate(zip(steps, values, strict=True)):
        last = step + (behind if i == 2 else 0)
        assert b.put(int(pos[i]), {"ws": [step - 4, step], "w": [value / 2, value]}, 0, last)
    d = json.loads(b.encode())
    assert field in d and wfield in d
    assert not ({"ws", "ws1", "ws2", "ws4"} - {field}) & d.keys()
    assert not ({"w", "w4"} - {wfield}) & d.keys()
    again = GrowthWindows.decode(json.dumps(d), b.keys_row())
    for k, step, value in zip(keys, steps, values, strict=True):
        got = again.take(again.index[k])
        assert got == {"ws": [step - 4, step], "w": [value / 2, value]}
        assert all(type(x) is int for x in got["ws"]) and all(type(x) is float for x in got["w"])
