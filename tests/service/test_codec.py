"""Chunk packing for SQLite: every encoding decodes to exactly what went in."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from logitwatch.service.store.codec import (
    decode_floats,
    decode_steps,
    encode_floats,
    encode_steps,
    pg_array,
    raw_floats,
    raw_steps,
)


@pytest.mark.parametrize(
    "steps",
    [
        np.arange(5, 105),  # contiguous: no bytes at all
        np.arange(0, 1000, 10),  # constant stride
        np.array([3, 4, 9, 100, 2**62]),  # anything ascending
        np.array([7]),
    ],
)
def test_steps_round_trip(steps):
    steps = steps.astype(np.int64)
    for blob in (encode_steps(steps), raw_steps(steps)):
        assert decode_steps(blob, int(steps[0]), len(steps)).tolist() == steps.tolist()
    assert encode_steps(np.arange(5, 105)) == b""


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=300))
def test_floats_round_trip_bit_for_bit(values):
    a = np.array(values, dtype=np.float64)
    for blob in (encode_floats(a), raw_floats(a)):
        assert decode_floats(blob, len(a)).tobytes() == a.tobytes()


def test_smooth_series_compress_and_noise_stays_raw():
    times = 1.75e9 + np.arange(10_000) * 0.5
    assert len(encode_floats(times)) < 0.1 * times.nbytes
    noise = np.random.default_rng(0).random(10_000)
    assert encode_floats(noise)[:1] == b"U"  # kept raw; b"R" marks ingest's unmerged chunks
    nan_payload = np.frombuffer(b"\x01\x00\x00\x00\x00\x00\xf8\x7f", dtype=np.float64)
    assert decode_floats(encode_floats(nan_payload), 1).tobytes() == nan_payload.tobytes()


def test_pg_binary_array():
    cells = np.zeros(3, dtype=[("len", ">i4"), ("v", ">f8")])
    cells["len"], cells["v"] = 8, [1.5, math.inf, -2.0]
    header = np.array([1, 0, 701, 3, 1], dtype=">i4").tobytes()
    assert pg_array(header + cells.tobytes(), "f8").tolist() == [1.5, math.inf, -2.0]
    assert len(pg_array(np.array([0, 0, 701], dtype=">i4").tobytes(), "f8")) == 0


def test_pg_binary_form_round_trips():
    from logitwatch.service.store.codec import pg_array_bytes

    for a, kind in ((np.array([1, 2, 2**62]), "i8"), (np.array([math.nan, -0.0, 1e300]), "f8")):
        assert pg_array(pg_array_bytes(a, kind), kind).tobytes() == a.tobytes()
    assert len(pg_array(pg_array_bytes(np.empty(0), "f8"), "f8")) == 0
