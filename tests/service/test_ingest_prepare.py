"""prepare_batch's fast paths give exactly what the general path gives.

A fleet's request carries a few hundred one-point series: prepare_batch reads the whole batch
into three numpy arrays, packs one-point series without numpy, and decode_batch remembers the
series names it has checked. Each shortcut is checked here against the plain functions.
"""

from __future__ import annotations

import numpy as np
import pytest

from logitwatch.protocol import Batch, ProtocolError, decode_batch, encode_batch
from logitwatch.protocol import series_from_columns as S
from logitwatch.service.store.codec import raw_floats, raw_steps
from logitwatch.service.store.ingest import prepare_batch, series_columns
from logitwatch.service.store.sql import labels_key, pg_arrays


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
