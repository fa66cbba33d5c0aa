"""Property tests on the protocol decoder: whatever bytes arrive, decode_batch either returns a
valid Batch or raises ProtocolError naming a field; it never crashes or hangs."""

from __future__ import annotations

import json
import math

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitwatch.protocol import (
    MAX_LABEL_VALUE_LEN,
    Batch,
    ProtocolError,
    decode_batch,
    encode_batch,
    series_from_columns,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
MSGPACK = "application/msgpack"
NASTY = ["'; DROP TABLE runs;--", "$(rm -rf /)", "`id`", "a;b|c&d", "a b", "\x00", "é"]


def _valid() -> Batch:
    s = series_from_columns("attn.logit_max", {"layer": 0, "head": 1}, range(10), range(10))
    return Batch("c", 1, 0, [s, series_from_columns("loss", {}, [3, 5], [2.5, float("nan")])])


def _outcome(body: bytes, content_type: str = MSGPACK) -> Batch | ProtocolError:
    try:
        return decode_batch(body, content_type)
    except ProtocolError as exc:
        assert exc.field and exc.message, exc  # names the problem
        return exc


def _refused(obj, content_type: str = MSGPACK) -> ProtocolError:
    body = msgpack.packb(obj, use_bin_type=True) if content_type == MSGPACK else obj
    out = _outcome(body, content_type)
    assert isinstance(out, ProtocolError), f"accepted {obj!r:.200}"
    return out


def _batch_with(series: dict) -> dict:
    return {"client": "c", "seq": 1, "segment": 0, "series": [series]}


@FAST
@given(st.binary(max_size=2048), st.sampled_from([MSGPACK, "application/json"]))
def test_random_bytes_are_refused_or_valid(body, content_type):
    out = _outcome(body, content_type)
    assert isinstance(out, (Batch, ProtocolError))


@FAST
@given(st.data())
def test_mutated_valid_batches_are_refused_or_valid(data):
    body = bytearray(encode_batch(_valid()))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(body) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            body[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del body[i:]
            if not body:
                break
        else:
            body[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    out = _outcome(bytes(body))
    if isinstance(out, Batch):  # whatever survived decoding is internally consistent
        for s in out.series:
            assert len(s.values) == len(s.steps) and len(s.times) in (0, len(s.steps))
            assert all(0 <= x <= 2**62 for x in s.steps)


def test_deep_nesting_is_refused():
    head = msgpack.packb({"client": "c", "seq": 1})
    deep = b"\x83" + head[1:] + b"\xa6series" + b"\x91" * 100_000 + b"\x01"  # [[[...1]]]
    assert _outcome(deep).field in ("body", "series[0]")
    text = b"[" * 100_000 + b"]" * 100_000  # deeper than json's recursion limit
    assert _refused(text, "application/json").field == "body"


def test_huge_declared_arrays_are_refused_without_allocating():
    # A msgpack array header claiming 2**32-1 items followed by nothing.
    assert _refused(b"\xdd\xff\xff\xff\xff", MSGPACK).field == "body"
    assert _refused(b"\xdb\xff\xff\xff\xff", MSGPACK).field == "body"  # str32 of 4 GiB


@FAST
@given(st.integers(0, 50), st.integers(0, 50))
def test_mismatched_lengths_name_the_array(n_steps, n_values):
    if n_steps == n_values:
        n_values += 1
    err = _refused(_batch_with({"metric": "loss", "steps": list(range(n_steps)),
                                "values": [1.0] * n_values}))  # fmt: skip
    assert err.field == "series[0].values" and "lengths must match" in err.message


@FAST
@given(st.one_of(st.integers(-(2**63), -1), st.integers(min_value=2**62 + 1, max_value=2**64 - 1)))
def test_steps_out_of_range_are_refused(bad):
    err = _refused(_batch_with({"metric": "loss", "steps": [0, bad], "values": [1.0, 2.0]}))
    assert err.field.startswith("series[0].steps")


@FAST
@given(st.sampled_from([math.nan, math.inf, 1.5, "1", None, True, [1]]))
def test_non_integer_steps_are_refused(bad):
    err = _refused(_batch_with({"metric": "loss", "steps": [bad], "values": [1.0]}))
    assert err.field == "series[0].steps[0]"


def test_packed_steps_out_of_range_are_refused():
    packed = (-1).to_bytes(8, "little", signed=True)
    err = _refused(_batch_with({"metric": "loss", "steps": packed, "values": [1.0]}))
    assert err.field == "series[0].steps"
    err = _refused(_batch_with({"metric": "loss", "steps": b"\x00" * 7, "values": []}))
    assert "multiple of 8" in err.message


@FAST
@given(st.text(min_size=MAX_LABEL_VALUE_LEN + 1, max_size=5000, alphabet="ab"))
def test_enormous_label_values_are_refused(value):
    err = _refused(_batch_with({"metric": "loss", "labels": {"k": value}, "steps": [1],
                                "values": [1.0]}))  # fmt: skip
    assert err.field == "series[0].labels.k"


@FAST
@given(st.sampled_from(NASTY), st.sampled_from(["metric", "label_key", "label_value", "client"]))
def test_sql_and_shell_metacharacters_in_names_are_refused(name, where):
    series = {"metric": "loss", "labels": {}, "steps": [1], "values": [1.0]}
    batch = _batch_with(series)
    if where == "metric":
        series["metric"] = name
    elif where == "label_key":
        series["labels"] = {name: "x"}
    elif where == "label_value":
        series["labels"] = {"k": name}
    else:
        batch["client"] = name
    err = _refused(batch)
    assert err.field in ("client", "series[0].metric", "series[0].labels", "series[0].labels.k")


def test_non_utf8_is_refused_in_both_encodings():
    raw = msgpack.packb({"client": "c", "seq": 1, "series": []})
    bad = raw.replace(b"\xa1c", b"\xa1\xff")  # the client name's one byte -> invalid UTF-8
    assert _refused(bad).field == "body"
    assert (
        _refused(b'{"client": "\xff", "seq": 1, "series": []}', "application/json").field == "body"
    )


def test_duplicate_series_in_one_batch_are_refused():
    s = {"metric": "loss", "steps": [1], "values": [1.0]}
    err = _refused({"client": "c", "seq": 1, "series": [s, dict(s)]})
    assert err.field == "series[1]" and "twice" in err.message


@FAST
@given(st.lists(st.integers(0, 100), min_size=2, max_size=30))
def test_duplicate_and_unordered_steps_decode_as_sent(steps):
    # The decoder keeps them; the store sorts them and keeps a step's last value
    # (tests/service/test_hostile_ingest.py proves that over HTTP).
    body = json.dumps(_batch_with({"metric": "loss", "steps": steps, "values": steps})).encode()
    out = _outcome(body, "application/json")
    assert isinstance(out, Batch) and list(out.series[0].steps) == steps


def test_unknown_version_and_content_type_are_refused():
    assert _refused({"v": 2, "client": "c", "seq": 1, "series": []}).field == "v"
    assert _outcome(b"{}", "text/html").field == "content-type"
