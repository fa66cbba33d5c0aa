import json
import math

import msgpack
import pytest

from logitwatch.protocol import (
    Batch,
    ProtocolError,
    decode_batch,
    encode_batch,
    series_from_columns,
)

NONFINITE = [math.nan, math.inf, -math.inf, 1.5, -0.0]


def _batch():
    return Batch(
        client="c1",
        seq=7,
        segment=1,
        series=[
            series_from_columns("loss", {}, [0, 1, 2, 3, 4], NONFINITE, [1.0] * 5),
            series_from_columns("attn.logit_max", {"layer": 0, "head": 3}, [5], [12.0]),
        ],
    )


@pytest.mark.parametrize(
    "fmt,ct", [("msgpack", "application/msgpack"), ("json", "application/json")]
)
def test_roundtrip_keeps_nonfinite_exactly(fmt, ct):
    b = decode_batch(encode_batch(_batch(), fmt=fmt), ct)
    assert (b.client, b.seq, b.segment) == ("c1", 7, 1)
    vals = list(b.series[0].values)
    assert math.isnan(vals[0]) and vals[1] == math.inf and vals[2] == -math.inf
    assert vals[3] == 1.5 and math.copysign(1, vals[4]) == -1
    assert b.series[1].labels == {"head": "3", "layer": "0"}
    assert list(b.series[1].steps) == [5]


def test_json_spelling_of_nonfinite():
    doc = json.loads(encode_batch(_batch(), fmt="json"))
    assert doc["series"][0]["values"][:3] == ["NaN", "Infinity", "-Infinity"]


def test_msgpack_lists_accepted():
    body = msgpack.packb(
        {
            "client": "x",
            "seq": 0,
            "series": [{"metric": "loss", "steps": [1, 2], "values": [1.0, 2]}],
        }
    )
    b = decode_batch(body, "application/msgpack")
    assert list(b.series[0].values) == [1.0, 2.0] and b.segment == 0


@pytest.mark.parametrize(
    "doc,field",
    [
        ({"client": "x", "seq": -1, "series": []}, "seq"),
        ({"seq": 1, "series": []}, "client"),
        (
            {
                "client": "x",
                "seq": 1,
                "series": [{"metric": "Bad Name", "steps": [], "values": []}],
            },
            "series[0].metric",
        ),
        (
            {
                "client": "x",
                "seq": 1,
                "series": [{"metric": "loss", "steps": [1, 2], "values": [1.0]}],
            },
            "series[0].values",
        ),
        (
            {
                "client": "x",
                "seq": 1,
                "series": [{"metric": "loss", "steps": [-3], "values": [1.0]}],
            },
            "series[0].steps[0]",
        ),
        (
            {
                "client": "x",
                "seq": 1,
                "series": [
                    {"metric": "loss", "labels": {"layer": "a b"}, "steps": [1], "values": [1.0]}
                ],
            },
            "series[0].labels.layer",
        ),
        (
            {
                "client": "x",
                "seq": 1,
                "series": [{"metric": "loss", "steps": [1], "values": ["x"]}],
            },
            "series[0].values[0]",
        ),
    ],
)
def test_bad_batches_name_the_field(doc, field):
    with pytest.raises(ProtocolError) as err:
        decode_batch(json.dumps(doc).encode(), "application/json")
    assert err.value.field == field


def test_malformed_bytes():
    with pytest.raises(ProtocolError) as err:
        decode_batch(b"\xc1\xc1garbage", "application/msgpack")
    assert err.value.field == "body"
    with pytest.raises(ProtocolError):
        decode_batch(b"{not json", "application/json")
