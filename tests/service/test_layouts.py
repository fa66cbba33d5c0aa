"""api/layouts.py: a run's one-step report decoded by its learned byte layout gives exactly what
decode_batch and prepare_batch give, and whatever else comes takes (and fails in) the full path.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from logitwatch.protocol import Batch, ProtocolError, encode_batch
from logitwatch.protocol import series_from_columns as S
from logitwatch.service.api.layouts import Layouts
from logitwatch.service.api.routes.points import _decode

MSGPACK = "application/msgpack"


def _report(seq: int, step: int, values: list[float], *, timed: bool = True) -> bytes:
    series = [S("loss", {}, [step], [values[0]], [1.7e9 + step] * timed)]
    series += [
        S("attn.logit_max", {"layer": str(i // 4), "head": str(i % 4)}, [step], [v], [2.0] * timed)
        for i, v in enumerate(values[1:])
    ]
    return encode_batch(Batch("trainer-1", seq, 2, series))


def _outcome(fn, *args):
    """What a decode gives: (batch, prepared) as comparable values, or its error."""
    try:
        batch, prepared = fn(*args)
    except ProtocolError as exc:
        return ("error", exc.field, str(exc))
    series = [
        (s.metric, s.labels, s.steps.tobytes(), s.values.tobytes(), s.times.tobytes())
        for s in batch.series
    ]
    cols = [tuple((c.dtype.str, c.shape, c.tobytes()) for c in col) for col in prepared.columns]
    points = None
    if prepared.points is not None:
        points = tuple((c.dtype.str, c.shape, c.tobytes()) for c in prepared.points)
    return (
        (batch.client, batch.seq, batch.segment, series),
        (prepared.postgres, prepared.rows, cols, prepared.keys, points),
    )


def _both(layouts: Layouts, run: str, body: bytes, ct: str = MSGPACK, postgres: bool = False):
    fast = _outcome(layouts.decode, run, body, ct, postgres, _decode)
    assert fast == _outcome(_decode, body, ct, postgres)
    return fast


@pytest.mark.parametrize("timed", [True, False])
@pytest.mark.parametrize("postgres", [False, True])
def test_reports_read_by_their_layout_equal_the_full_decode(timed, postgres):
    layouts, rng = Layouts(), np.random.default_rng(0)
    for seq in range(40):
        values = rng.normal(size=13).tolist()
        if seq % 7 == 3:
            values[2], values[5], values[0] = math.nan, math.inf, -math.inf
        _both(layouts, "r", _report(seq, 1000 + 3 * seq, values, timed=timed), postgres=postgres)
    assert "r" in layouts._by_run  # learned, then used


def test_a_report_that_is_not_the_learned_layout_takes_the_full_path():
    layouts = Layouts()
    _both(layouts, "r", _report(1, 10, [1.0] * 13))
    # Same length, another label value: the fixed bytes differ.
    other = _report(2, 11, [1.0] * 13).replace(b"\xa4head\xa13", b"\xa4head\xa19")
    got = _both(layouts, "r", other)
    assert got[0][3][-1][1] == {"layer": "2", "head": "9"}
    # A seq of another width (now a uint16), another run, JSON, a smaller report.
    _both(layouts, "r", _report(300, 12, [1.0] * 13))
    _both(layouts, "r", _report(301, 13, [2.0] * 13))
    _both(layouts, "other", _report(302, 14, [3.0] * 13))
    body = encode_batch(Batch("c", 5, 0, [S("loss", {}, [1], [1.0])] * 1), fmt="json")
    _both(layouts, "r", body, "application/json")
    _both(layouts, "r", _report(303, 15, [1.0] * 3))


def test_a_step_out_of_range_gets_the_full_path_error():
    layouts = Layouts()
    _both(layouts, "r", _report(1, 10, [1.0] * 13))
    body = _report(2, 11, [1.0] * 13)
    at = body.index(struct.pack("<q", 11))
    for bad in (-1, 2**62 + 1):
        mutated = body[:at] + struct.pack("<q", bad) + body[at + 8 :]
        got = _both(layouts, "r", mutated)
        assert got[0] == "error" and got[1].endswith(".steps")


def test_every_byte_changed_decodes_as_the_full_path_decodes_it():
    layouts = Layouts()
    base = _report(200, 10, [1.5] * 13)
    _both(layouts, "r", base)
    rng = np.random.default_rng(1)
    for at in range(len(base)):
        for new in {base[at] ^ 0x01, base[at] ^ 0x80, int(rng.integers(256))}:
            mutated = base[:at] + bytes([new]) + base[at + 1 :]
            _both(layouts, "r", mutated)
            _both(layouts, "r", base)  # the layout of base again


def test_each_batch_gets_its_own_labels():
    layouts = Layouts()
    first = _report(1, 10, [1.0] * 13)
    _both(layouts, "r", first)
    a, _ = layouts.decode("r", _report(2, 11, [1.0] * 13), MSGPACK, False, _decode)
    a.series[1].labels["layer"] = "changed"
    b, _ = layouts.decode("r", _report(3, 12, [1.0] * 13), MSGPACK, False, _decode)
    assert b.series[1].labels == {"layer": "0", "head": "0"}


def test_a_layout_is_relearned_when_the_reports_changed_for_good_not_for_one():
    layouts = Layouts()
    _both(layouts, "r", _report(100, 10, [1.0] * 13))
    learned = layouts._by_run["r"]
    _both(layouts, "r", _report(101, 11, [1.0] * 9))  # one other report: the layout stays
    _both(layouts, "r", _report(102, 12, [1.0] * 13))
    assert layouts._by_run["r"] is learned
    _both(layouts, "r", _report(300, 13, [1.0] * 13))  # seq now a uint16: misses...
    assert layouts._by_run["r"] is learned
    _both(layouts, "r", _report(301, 14, [1.0] * 13))  # ...twice in a row: learned again
    assert layouts._by_run["r"].seq_len == 3


def test_a_layout_hit_carries_its_shape_and_runs_of_one_shape_share_it():
    layouts = Layouts()
    for run in ("a", "b"):
        for seq in range(2):
            _, prepared = layouts.decode(
                run, _report(seq, seq, [1.0] * 13), MSGPACK, False, _decode
            )
    batch, full = _decode(_report(0, 0, [1.0] * 13), MSGPACK, False)
    pairs = tuple(zip([s.metric for s in batch.series], full.keys, strict=True))
    assert prepared.shape is not None and prepared.shape.pairs == pairs
    assert prepared.shape == layouts._by_run["a"].shape and hash(prepared.shape) == hash(pairs)
    assert full.shape is None  # the full path knows no shape


def test_runs_of_one_report_shape_keep_their_own_series_and_points(client, run_name):
    """Series ids are cached per (run, Shape): two runs posting the same report each get
    their own series, and each series its own points, through the real service."""
    runs = {f"{run_name}-a": 0.0, f"{run_name}-b": 100.0}
    for seq in range(4):
        for run, base in runs.items():
            body = _report(seq, 10 + seq, [base + seq + i / 100 for i in range(13)])
            r = client.post(
                f"/api/v1/runs/{run}/points", content=body, headers={"content-type": MSGPACK}
            )
            assert r.status_code == 200, r.text
    for run, base in runs.items():
        series = client.get(f"/api/v1/runs/{run}/series").json()["series"]
        assert len(series) == 13
        got = sorted(s["last_value"] for s in series)
        assert got == pytest.approx([base + 3 + i / 100 for i in range(13)])
        assert {(s["n_points"], s["last_step"]) for s in series} == {(4, 13)}
