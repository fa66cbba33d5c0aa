"""prepare_batch's fast paths give exactly what the general path gives.

A fleet's request carries a few hundred one-point series: prepare_batch reads the whole batch
into three numpy arrays, packs one-point series without numpy, and decode_batch remembers the
series names it has checked. Each shortcut is checked here against the plain functions.
"""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import text

from logitwatch.protocol import Batch, ProtocolError, decode_batch, encode_batch
from logitwatch.protocol import series_from_columns as S
from logitwatch.service.store import reports
from logitwatch.service.store.codec import raw_floats, raw_steps
from logitwatch.service.store.ingest import ingest_batch, prepare_batch, series_columns
from logitwatch.service.store.sql import is_pg, labels_key, pg_arrays


def _mixed() -> Batch:
    series = [S("loss", {}, [7], [2.5], [1.7e9])]
    series += [S("attn.logit_max", {"layer": i, "head": 0}, [7], [float(i)]) for i in range(12)]
    series += [
        S("grad.norm", {}, [3, 4, 5], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
        S("lr", {}, [5, 3, 5, 4], [1.0, 2.0, 3.0, 4.0]),  # unsorted, step 5 twice: last wins
        S("loss.z", {}, [], []),
        S("update.ratio", {}, [9, 10], [float("nan"), float("inf")]),
        S("logits.mean", {}, [8, 8], [1.0, 2.0], [5.0, 6.0]),  # one step twice, at the end
    ]
    return Batch("c", 1, 2, series)


@pytest.mark.parametrize("postgres", [False, True])
def test_prepared_columns_and_rows_match_the_plain_functions(postgres):
    batch = _mixed()
    prepared = prepare_batch(batch, postgres=postgres)
    assert prepared.keys == [labels_key(s.labels) for s in batch.series]
    rows = {i: (chunk, last) for i, chunk, last in prepared.rows}
    for i, s in enumerate(batch.series):
        want = series_columns(s)
        got = prepared.columns[i]
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (s.metric, a, b)
        steps, values, times = want
        if not len(steps):
            assert i not in rows
            continue
        chunk, last = rows[i]
        assert chunk[:4] == (2, steps[0], steps[-1], len(steps))
        if postgres:
            assert [p.data for p in chunk[4:]] == [p.data for p in pg_arrays(*want)]
        else:
            assert chunk[4:] == (raw_steps(steps), raw_floats(values), raw_floats(times))
        last_time = float(times[-1]) if len(times) else None
        assert last[:2] == (2, steps[-1]) and last[3:] == (last_time, len(steps), steps[0])
        assert last[2] == values[-1] or (np.isnan(last[2]) and np.isnan(values[-1]))


def test_remembered_names_never_let_through_what_the_checks_refuse():
    ok = encode_batch(Batch("c", 1, 0, [S("attn.logit_max", {"layer": 1}, [1], [1.0])]))
    assert decode_batch(ok).series[0].labels == {"layer": "1"}
    # msgpack keeps the types apart: True == 1 in Python, but a bool label value is refused.
    import msgpack

    for labels in ({"layer": True}, {"layer": 1.5}, {"Layer": "1"}):
        body = msgpack.packb({"client": "c", "seq": 2, "series": [
            {"metric": "attn.logit_max", "labels": labels, "steps": [1], "values": [1.0]}]})  # fmt: skip
        with pytest.raises(ProtocolError, match="labels"):
            decode_batch(body)
    again = decode_batch(ok).series[0]
    again.labels["layer"] = "changed"  # each batch gets its own labels dict
    assert decode_batch(ok).series[0].labels == {"layer": "1"}


def _one_step(times: bool) -> Batch:
    """The fleet's report: every series one step (the same one), all with a time or none."""
    series = [
        S("attn.logit_max", {"layer": i // 4, "head": i % 4}, [41], [float(i)], [1.7e9] * times)
        for i in range(12)
    ]
    series[3].values[0] = float("nan")
    return Batch("c", 1, 3, series)


@pytest.mark.parametrize("times", [False, True])
def test_a_one_step_report_is_stored_as_the_general_path_stores_it(sessions, run_name, times):
    batch = _one_step(times)
    with sessions() as s:
        fast = prepare_batch(batch, postgres=is_pg(s))
        assert fast.points is not None and not fast.rows
        result = ingest_batch(s, run=f"{run_name}-fast", batch=batch, prepared=fast)
        # One row of reports, no chunk yet; turned into chunks, the same as the general path's.
        assert result.report
        count = "SELECT count(*) FROM {} WHERE run_id = :r"
        assert s.scalar(text(count.format("reports")), {"r": result.run_id}) == 1
        assert reports.flush(s, [result.run_id]) == [(sid, 3) for sid in sorted(result.series_ids)]
        assert s.scalar(text(count.format("reports")), {"r": result.run_id}) == 0
        # Eight series or more take the one-step path; each alone takes the general one.
        for seq, one in enumerate(batch.series):
            alone = Batch("c", seq, 3, [one])
            assert prepare_batch(alone, postgres=is_pg(s)).points is None
            ingest_batch(s, run=f"{run_name}-plain", batch=alone)
        s.commit()
        stored = {}
        for kind in ("fast", "plain"):
            q = text(
                "SELECT s.metric, s.labels_key, c.segment, c.step_min, c.step_max, c.n, c.steps,"
                ' c."values", c.times, l.segment, l.step, l.value, l.time, l.n_points,'
                " l.first_step FROM series s JOIN runs r ON r.id = s.run_id"
                " JOIN chunks c ON c.series_id = s.id JOIN latest l ON l.series_id = s.id"
                " WHERE r.name = :run ORDER BY s.metric, s.labels_key"
            )
            rows = s.execute(q, {"run": f"{run_name}-{kind}"}).all()
            stored[kind] = [
                tuple(bytes(x) if isinstance(x, memoryview) else x for x in r) for r in rows
            ]
    assert len(stored["fast"]) == 12
    # NaN != NaN: compare the rows' text, where NaN (or SQLite's NULL for it) reads the same
    assert repr(stored["fast"]) == repr(stored["plain"])
    for i, s in enumerate(batch.series):
        for a, b in zip(
            fast.columns[i],
            prepare_batch(Batch("c", i, 3, [s]), postgres=False).columns[0],
            strict=True,
        ):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def test_a_one_step_report_decodes_as_the_general_path_decodes_it():
    batch = _one_step(times=True)
    body = encode_batch(batch)
    first, again = decode_batch(body), decode_batch(body)  # the names are checked, then known
    for got in (first, again):
        assert [(s.metric, s.labels, s.steps, s.times) for s in got.series] == [
            (s.metric, s.labels, s.steps, s.times) for s in batch.series
        ]
        assert np.array_equal(
            [s.values[0] for s in got.series], [s.values[0] for s in batch.series], equal_nan=True
        )
    # Known names do not let a step out of range, or mismatched lengths, through.
    batch.series[0].steps[0] = -1
    with pytest.raises(ProtocolError, match=r"series\[0\].steps"):
        decode_batch(encode_batch(batch))
    batch.series[0].steps[0] = 41
    batch.series[1].times.append(1.0)
    with pytest.raises(ProtocolError, match=r"series\[1\].times"):
        decode_batch(encode_batch(batch))
