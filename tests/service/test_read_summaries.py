"""Bucketed reads from chunk summaries answer exactly what the points answer, on SQLite and
PostgreSQL: spikes, NaN and inf kept, chunks cut by the range, rewritten steps, segments."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sqlalchemy import delete, func, select

from logitwatch.protocol import Batch, series_from_columns
from logitwatch.service import store
from logitwatch.service.store import read as store_read
from logitwatch.service.store.compact import compact_all, compact_series
from logitwatch.service.store.models import ChunkSummary
from logitwatch.service.store.summary import bucketize, grid

N = 60_000
COLUMNS = ("steps", "last_steps", "count", "min", "max", "first", "last", "nan")


def _values(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = 1.0 + 0.01 * np.cumsum(rng.standard_normal(n))
    v[12_345] = 1e6  # one-step spikes, up and down
    v[40_001] = -1e6
    v[7_000] = math.nan
    v[7_001:7_064] = math.nan  # a block of NaN but one
    v[33_333] = math.inf
    v[50_000] = -math.inf
    return v


def _send(sessions, run, steps, values, *, seq0=0, segment=0, per_batch=5_000):
    for k, a in enumerate(range(0, len(steps), per_batch)):
        s = series_from_columns("m", {}, steps[a : a + per_batch], values[a : a + per_batch])
        with sessions() as session:
            store.ingest_batch(session, run=run, batch=Batch("c", seq0 + k, segment, [s]))
            session.commit()


def _read(sessions, run, **kw):
    with sessions() as session:
        return store.read_points(session, run=run, metric="m", **kw).series


def _summaries(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(ChunkSummary))


def _same(a, b) -> None:
    assert a.segment == b.segment
    for k in COLUMNS:
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype.kind == y.dtype.kind, k
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), k


# (start, end, max_points): the whole series; ranges that cut merged chunks; a grid too fine
# for the summaries (points only); a range past the data.
READS = [
    (None, None, 50),
    (None, None, 7),
    (5_000, 51_234, 40),
    (1_001, None, 20),
    (None, 44_444, 33),
    (12_345, 12_345, 5),
    (100, 300, 10),
    (None, None, 5_000),
    (70_000, 80_000, 10),
]


def _answers(sessions, run, reads=READS, **kw):
    return [_read(sessions, run, start=s, end=e, max_points=m, **kw) for s, e, m in reads]


def _check_summaries_match_points(sessions, run, **kw):
    with_summaries = _answers(sessions, run, **kw)
    with sessions() as session:
        session.execute(delete(ChunkSummary))
        session.commit()
    from_points = _answers(sessions, run, **kw)
    for got, want in zip(with_summaries, from_points, strict=True):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _same(a, b)
    return with_summaries


def test_summaries_answer_what_the_points_answer(sessions, run_name):
    steps, values = np.arange(N), _values(N)
    _send(sessions, run_name, steps, values)
    assert compact_all(sessions, run=run_name) > 0
    assert _summaries(sessions) >= 1
    answers = _check_summaries_match_points(sessions, run_name)
    # ... and both are the buckets of the points themselves, spikes and non-finites kept.
    (whole,) = answers[0]
    want = bucketize(steps, values, 50)
    for k in COLUMNS:
        assert np.array_equal(getattr(whole, k), want[k], equal_nan=True), k
    assert len(whole.steps) <= 50 and whole.count.sum() == N
    assert whole.max.max() == math.inf and whole.min.min() == -math.inf
    spike = np.searchsorted(whole.steps, 12_345, "right") - 1
    assert whole.max[spike] == 1e6
    assert whole.nan.sum() == 64
    (cut,) = answers[2]
    assert cut.steps[0] == 5_000 and cut.last_steps[-1] == 51_234
    assert cut.count.sum() == 51_234 - 5_000 + 1
    down = np.searchsorted(cut.steps, 40_001, "right") - 1
    assert cut.min[down] == -1e6 and cut.min.min() == -math.inf


def test_rewrites_and_resumed_segments_read_the_newest_points(sessions, run_name):
    steps, values = np.arange(N), _values(N, seed=1)
    _send(sessions, run_name, steps, values)
    compact_all(sessions, run=run_name)
    # A step logged twice (its second value wins), inside a summarized chunk ...
    _send(sessions, run_name, np.array([20_000]), np.array([7e7]), seq0=100)
    # ... and a resume from a checkpoint at step 45,000: segment 1 overrides from there on.
    tail = np.arange(45_000, N)
    _send(sessions, run_name, tail, np.full(len(tail), 2.0), seq0=200, segment=1)
    compact_all(sessions, run=run_name)
    answers = _check_summaries_match_points(sessions, run_name)
    (whole,) = answers[0]
    assert whole.max[np.searchsorted(whole.steps, 20_000, "right") - 1] == 7e7
    # segment 1 holds 2.0 from step 45,000 on: the -inf at 50,000 is overridden
    assert whole.last[-1] == 2.0 and whole.min.min() == -1e6
    per_segment = _check_summaries_match_points(sessions, run_name, segments_all=True)
    assert [b.segment for b in per_segment[0]] == [0, 1]


def test_sparse_series_use_wider_blocks(sessions, run_name):
    steps = np.arange(0, 10 * N, 10)  # reported every 10th step
    _send(sessions, run_name, steps, _values(N, seed=2))
    compact_all(sessions, run=run_name)
    with sessions() as session:
        levels = session.scalars(select(ChunkSummary.level)).all()
    assert levels and min(levels) >= 9  # ~64 points a block: 2**9 = 512 steps
    _check_summaries_match_points(sessions, run_name)


def test_a_chunk_replaced_between_listing_and_reading_is_read_again(sessions, run_name):
    steps, values = np.arange(N), _values(N, seed=3)
    _send(sessions, run_name, steps, values)
    sid = _read(sessions, run_name, max_points=1)[0].series_id
    with sessions() as session:
        listed = store_read._bucket_chunks(session, [sid], None, None, all_points=False)[sid]
    assert compact_series(sessions, series_id=sid, segment=0, min_chunks=2) > 0
    with sessions() as session:
        assert store_read._points_of(session, listed) is None
    (whole,) = _read(sessions, run_name, max_points=50)
    assert whole.count.sum() == N
    assert whole.max[np.searchsorted(whole.steps, 12_345, "right") - 1] == 1e6


@pytest.mark.parametrize("seed", range(3))
def test_the_grid_covers_the_range_in_at_most_max_points_buckets(seed):
    rng = np.random.default_rng(seed)
    for _ in range(2_000):
        lo = int(rng.integers(0, 10**9))
        hi = lo + int(rng.integers(0, 10 ** int(rng.integers(1, 9))))
        m = int(rng.integers(1, 100_001))
        origin, width, g = grid(lo, hi, m)
        assert origin <= lo and origin + width * m > hi
        assert origin % g == 0 and width % g == 0
        plain = max(1, -(-(hi - lo + 1) // m))
        if g == 1:  # narrow buckets keep the plain equal widths from lo
            assert (origin, width) == (lo, plain)
        else:  # wide ones snap, widening them by under an eighth
            assert plain <= width < plain * 9 / 8 + g
