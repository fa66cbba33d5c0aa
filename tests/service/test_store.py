"""The store on SQLite and PostgreSQL: ingest, segments, idempotency, buckets, pages, compaction."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sqlalchemy import func, select, text

from logitwatch.protocol import Batch, series_from_columns
from logitwatch.service import store
from logitwatch.service.store import compact as compact_module
from logitwatch.service.store import stats as store_stats
from logitwatch.service.store.compact import (
    Compactor,
    compact_all,
    compact_many,
    compact_series,
    release_space,
)
from logitwatch.service.store.db import Writer, make_engine, make_sessionmaker, upgrade
from logitwatch.service.store.models import Chunk


def ingest(sessions, run, batch, **kw):
    with sessions() as s:
        result = store.ingest_batch(s, run=run, batch=batch, **kw)
        s.commit()
    return result


def read(sessions, run, metric, **kw):
    with sessions() as s:
        return store.read_points(s, run=run, metric=metric, **kw)


def one(batch_series, client="c", seq=0, segment=0):
    return Batch(client, seq, segment, batch_series)


def test_out_of_order_steps_over_several_batches(sessions, run_name):
    rng = np.random.default_rng(1)
    steps = rng.permutation(300)
    values = steps * 0.5
    for i, part in enumerate(np.array_split(np.arange(300), 5)):
        s = series_from_columns("loss", {}, steps[part], values[part], steps[part] + 1e9)
        ingest(sessions, run_name, one([s], seq=i))
    (got,) = read(sessions, run_name, "loss").series
    assert got.steps.tolist() == list(range(300))
    assert got.values.tolist() == [x * 0.5 for x in range(300)]
    assert got.times.tolist() == [x + 1e9 for x in range(300)]


def test_segments_newest_wins_and_late_batches_stay_in_their_segment(sessions, run_name):
    ingest(
        sessions, run_name, one([series_from_columns("loss", {}, range(100), [0.0] * 100)], seq=1)
    )
    # resumed from the checkpoint at step 50: segment 1
    ingest(
        sessions,
        run_name,
        one([series_from_columns("loss", {}, range(50, 150), [1.0] * 100)], seq=2, segment=1),
    )
    # a late batch of segment 0 (a replayed spool) must not shadow segment 1
    ingest(
        sessions,
        run_name,
        one([series_from_columns("loss", {}, range(100, 120), [9.0] * 20)], seq=3, segment=0),
    )
    (got,) = read(sessions, run_name, "loss").series
    assert got.segment is None
    assert got.steps.tolist() == list(range(150))
    assert got.values.tolist() == [0.0] * 50 + [1.0] * 100
    every = read(sessions, run_name, "loss", segments_all=True).series
    assert [(e.segment, len(e.steps)) for e in every] == [(0, 120), (1, 100)]
    with sessions() as s:
        info = store.get_run(s, name=run_name)
        (series,) = store.list_series(s, run=run_name)
    assert (info.max_segment, info.last_step) == (1, 149)
    assert (series.last_segment, series.last_step, series.last_value) == (1, 149, 1.0)
    assert series.n_points == 220 and series.first_step == 0


def test_client_seq_makes_a_batch_idempotent(sessions, run_name):
    batch = one([series_from_columns("loss", {}, range(10), range(10))], client="a", seq=5)
    assert not ingest(sessions, run_name, batch).duplicate
    assert ingest(sessions, run_name, batch).duplicate
    other = one([series_from_columns("loss", {}, range(10, 20), range(10))], client="b", seq=5)
    assert not ingest(sessions, run_name, other).duplicate
    (got,) = read(sessions, run_name, "loss").series
    assert len(got.steps) == 20
    with sessions() as s:
        assert store.list_series(s, run=run_name)[0].n_points == 20


def test_buckets_keep_spikes_and_nan(sessions, run_name):
    values = np.ones(1000)
    values[123] = 1e6  # one-step spike
    values[456] = math.nan
    values[789] = -math.inf
    s = series_from_columns("grad.norm", {}, range(1000), values)
    ingest(sessions, run_name, one([s]))
    (b,) = read(sessions, run_name, "grad.norm", max_points=10).series
    assert b.steps.tolist() == list(range(0, 1000, 100))
    assert b.last_steps.tolist() == list(range(99, 1000, 100))
    assert b.count.tolist() == [100] * 10
    assert b.max[1] == 1e6 and b.min[1] == 1.0
    assert b.nan.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert b.min[4] == 1.0 and b.max[4] == 1.0  # min/max skip NaN; nan says it was there
    assert b.min[7] == -math.inf
    # a step range and uneven widths
    (b,) = read(sessions, run_name, "grad.norm", max_points=3, start=100, end=199).series
    assert b.steps.tolist() == [100, 134, 168] and b.count.sum() == 100


def test_label_filters_and_pages(sessions, run_name):
    series = [
        series_from_columns("attn.logit_max", {"layer": layer, "head": head}, range(25), range(25))
        for layer in range(2)
        for head in range(2)
    ]
    ingest(sessions, run_name, one(series))
    assert len(read(sessions, run_name, "attn.logit_max", labels={"layer": "1"}).series) == 2
    assert (
        len(read(sessions, run_name, "attn.logit_max", labels={"layer": 1, "head": 0}).series) == 1
    )
    pages, cursor = [], None
    while True:
        page = read(sessions, run_name, "attn.logit_max", limit=30, cursor=cursor)
        pages.append(page)
        cursor = page.next_cursor
        if cursor is None:
            break
    got = [(e.series_id, int(st)) for p in pages for e in p.series for st in e.steps]
    assert len(pages) == 4 and len(got) == 100 and len(set(got)) == 100
    with pytest.raises(ValueError, match="cursor"):
        read(sessions, run_name, "attn.logit_max", cursor="nonsense")


def test_series_limit_rejects_the_whole_batch(sessions, run_name):
    batch = one([series_from_columns(f"m{i}", {}, [1], [1.0]) for i in range(4)])
    with sessions() as s, pytest.raises(store.LimitError, match="max_series_per_run=3"):
        store.ingest_batch(s, run=run_name, batch=batch, max_series=3)
    with sessions() as s:
        assert store.get_run(s, name=run_name) is None  # rolled back: nothing stored


def test_compaction_keeps_every_point_and_the_later_write(sessions, run_name):
    rng = np.random.default_rng(2)
    values = rng.normal(size=400)
    values[20] = math.nan
    for i in range(40):
        steps = np.arange(i * 10, i * 10 + 10)
        s = series_from_columns("loss", {}, steps, values[steps], 1.7e9 + steps * 0.25)
        ingest(sessions, run_name, one([s], seq=i))
    # a rewrite of steps 5..14 in the same segment: the later write wins, before and after
    s = series_from_columns("loss", {}, range(5, 15), [42.0] * 10, [0.0] * 10)
    ingest(sessions, run_name, one([s], seq=99))
    before = read(sessions, run_name, "loss").series[0]
    assert compact_all(sessions, run=run_name) == 41
    with sessions() as s:
        sid = store.list_series(s, run=run_name)[0].id
        assert s.scalar(select(func.count()).where(Chunk.series_id == sid)) == 1
    after = read(sessions, run_name, "loss").series[0]
    assert after.steps.tolist() == before.steps.tolist() == list(range(400))
    assert after.values.tobytes() == before.values.tobytes()
    assert after.times.tobytes() == before.times.tobytes()
    assert after.values[5:15].tolist() == [42.0] * 10
    assert math.isnan(after.values[20]) and after.values[16] == values[16]


def test_compactor_thread_merges_once_ingest_pauses(sessions, run_name):
    # Ingest writes as the service's does beside its compactor: through the writer's sessions
    # (SQLite: BEGIN IMMEDIATE, under the lock the compactor takes).
    writer = Writer(sessions.kw["bind"], sessions)
    compactor = Compactor(writer.sessionmaker, writer.lock, idle_s=0.05, deep_idle_s=0.3)
    compactor.start()
    try:
        for i in range(20):
            s = series_from_columns("lr", {"group": 0}, range(i * 5, i * 5 + 5), [0.1] * 5)
            with writer.lock:
                result = ingest(writer.sessionmaker, run_name, one([s], seq=i))
            compactor.touch(result.series_ids, 0)
        deadline = time.monotonic() + 20
        with sessions() as s:
            count = select(func.count()).where(Chunk.series_id == result.series_ids[0])
            # 20 chunks: one pass merges them all, or 16 then the 4 fresh ones
            while s.scalar(count) > 2 and time.monotonic() < deadline:
                s.rollback()  # see the compactor's commits
                time.sleep(0.05)
            assert s.scalar(count) <= 2
    finally:
        compactor.close()
    (got,) = read(sessions, run_name, "lr").series
    assert got.steps.tolist() == list(range(100)) and set(got.values.tolist()) == {0.1}


def test_sqlite_file_shrinks_after_compaction(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        empty = store_stats.storage_stats(s).bytes  # the schema's own pages
    rng = np.random.default_rng(3)
    for i in range(50):
        steps = np.arange(i * 200, i * 200 + 200)
        batch = one([series_from_columns("loss", {}, steps, rng.random(200), 1e9 + steps)], seq=i)
        ingest(sessions, "r", batch)
    with sessions() as s:
        before = store_stats.storage_stats(s)
    assert compact_all(sessions) == 50
    release_space(sessions)
    with sessions() as s:
        after = store_stats.storage_stats(s)
        assert s.scalar(text("PRAGMA freelist_count")) == 0
    engine.dispose()
    assert after.points == before.points == 10_000
    assert after.bytes - empty < 0.7 * (before.bytes - empty)
    assert (after.bytes - empty) / after.points < 12


def test_compact_many_skips_a_series_compacted_meanwhile_and_merges_the_rest(
    sessions, run_name, monkeypatch
):
    ids = []
    for i in range(3):
        series = [series_from_columns(m, {}, [i], [float(i)]) for m in ("a", "b", "c")]
        ids = ingest(sessions, run_name, one(series, seq=i)).series_ids
    with sessions() as s:  # "b" compacted by another process between the plan and the swap
        planned_b = s.scalars(select(Chunk.id).where(Chunk.series_id == ids[1])).all()
    assert compact_series(sessions, series_id=ids[1], segment=0, min_chunks=2) == 3
    real_plan = compact_module._plan

    def stale_plan(sid, seg, rows, pg):
        if sid == ids[1]:
            return planned_b, [], []
        return real_plan(sid, seg, rows, pg)

    monkeypatch.setattr(compact_module, "_plan", stale_plan)
    # b's chunks are read before the other process compacts them.
    real_suffixes = compact_module._suffixes

    def with_b(session, keys):
        out = real_suffixes(session, keys)
        out[ids[1], 0] = [(cid, 1, True, None) for cid in planned_b]
        return out

    monkeypatch.setattr(compact_module, "_suffixes", with_b)
    merged = compact_many(sessions, [(sid, 0) for sid in ids], min_chunks=2)
    assert merged == 6  # a and c; b's swap rolled back alone
    for metric in ("a", "b", "c"):
        (got,) = read(sessions, run_name, metric).series
        assert got.steps.tolist() == [0, 1, 2]
        assert got.values.tolist() == [0.0, 1.0, 2.0]
    with sessions() as s:
        for sid in ids:
            assert s.scalar(select(func.count()).where(Chunk.series_id == sid)) == 1


def test_paced_work_rests_in_proportion_to_each_group_and_keeps_every_point(
    sessions, run_name, monkeypatch
):
    """Under load the Compactor's merges and flushes rest ``pace`` times as long as each
    group of work took (so requests keep most of the GIL and the writer lock)."""
    monkeypatch.setattr(compact_module, "GROUP", 2)
    ids = []
    for i in range(3):
        series = [series_from_columns(m, {}, [i], [float(i)]) for m in ("a", "b", "c")]
        ids = ingest(sessions, run_name, one(series, seq=i)).series_ids
    clock, rests = [0.0], []
    monkeypatch.setattr(compact_module.time, "perf_counter", lambda: clock[0])

    def plans(*args):  # each group's reads and merges take 10 (fake) seconds
        clock[0] += 10.0
        return real_plans(*args)

    real_plans = compact_module._plans
    monkeypatch.setattr(compact_module, "_plans", plans)
    monkeypatch.setattr(compact_module.time, "sleep", rests.append)
    merged = compact_many(sessions, [(sid, 0) for sid in ids], min_chunks=2, pace=3.0)
    assert merged == 9 and rests == [30.0, 30.0]  # two groups (2 + 1 series), each rested
    for metric in ("a", "b", "c"):
        (got,) = read(sessions, run_name, metric).series
        assert got.steps.tolist() == [0, 1, 2]


def test_fresh_only_leaves_merged_chunks_alone(sessions, run_name):
    def add(i):
        s = series_from_columns("lr", {}, range(i * 10, i * 10 + 10), [float(i)] * 10)
        return ingest(sessions, run_name, one([s], seq=i)).series_ids[0]

    sid = add(0)
    add(1)
    add(2)
    assert compact_all(sessions, run=run_name) == 3
    for i in range(3, 6):
        add(i)
    merged = compact_series(sessions, series_id=sid, segment=0, min_chunks=2, fresh_only=True)
    with sessions() as s:
        n_chunks = s.scalar(select(func.count()).where(Chunk.series_id == sid))
    # The merged chunk has a summary, the fresh ones have none: only the three fresh merge.
    assert merged == 3 and n_chunks == 2
    (got,) = read(sessions, run_name, "lr").series
    assert got.steps.tolist() == list(range(60))
    assert got.values.tolist() == [float(i // 10) for i in range(60)]


def test_tiered_merges_leave_an_earlier_merged_chunk_until_the_newer_ones_match_it(
    sessions, run_name
):
    """The background compactor's merges: a one-step-a-second series is not rewritten
    whole every MERGE_CHUNKS batches; its merged chunks double like a binary counter."""
    sid = None
    for step in range(7 * 16):
        s = series_from_columns("loss", {}, [step], [step * 0.5], [1e9 + step])
        sid = ingest(sessions, run_name, one([s], seq=step)).series_ids[0]
        if step % 16 == 15:
            compact_many(sessions, [(sid, 0)], tiered=True)
    with sessions() as s:
        sizes = s.scalars(select(Chunk.n).where(Chunk.series_id == sid).order_by(Chunk.id)).all()
    assert sizes == [64, 32, 16]  # 7 x 16 points
    (got,) = read(sessions, run_name, "loss").series
    assert got.steps.tolist() == list(range(112))
    assert got.values.tolist() == [x * 0.5 for x in range(112)]
    assert got.times.tolist() == [1e9 + x for x in range(112)]
    assert compact_all(sessions, run=run_name) == 3  # an explicit compaction merges them all


def test_latest_keeps_each_series_newest_point_and_a_missing_time(sessions, run_name):
    def batch(seq, step, with_time):
        return one(
            [
                series_from_columns("loss", {}, [step], [math.nan], [1e9 + step]),
                series_from_columns("lr", {}, [step], [0.5 * step], [1e9 + step] * with_time),
            ],
            seq=seq,
        )

    ingest(sessions, run_name, batch(0, 3, True))
    ingest(sessions, run_name, batch(1, 7, False))
    ingest(sessions, run_name, batch(2, 5, True))  # late: the newest point stays step 7
    with sessions() as s:
        got = {i.metric: i for i in store.list_series(s, run=run_name)}
    assert (got["lr"].last_step, got["lr"].last_value, got["lr"].last_time) == (7, 3.5, None)
    assert (got["lr"].n_points, got["lr"].first_step) == (3, 3)
    assert got["loss"].last_step == 7 and got["loss"].last_time == 1e9 + 7
    assert math.isnan(got["loss"].last_value)


@pytest.mark.parametrize("with_time", [False, True])
def test_one_point_chunks_merge_with_the_later_write_and_nan_kept(sessions, run_name, with_time):
    steps = [*range(10), 5, 10, 11]  # step 5 again: the later write wins
    for seq, step in enumerate(steps):
        value = math.nan if step == 7 else float(seq)
        s = series_from_columns("loss", {}, [step], [value], [1e9 + seq] * with_time)
        sid = ingest(sessions, run_name, one([s], seq=seq)).series_ids[0]
    before = read(sessions, run_name, "loss").series[0]
    assert compact_many(sessions, [(sid, 0)], min_chunks=2, tiered=True) == len(steps)
    after = read(sessions, run_name, "loss").series[0]
    assert after.steps.tolist() == before.steps.tolist() == list(range(12))
    assert after.values.tobytes() == before.values.tobytes()
    assert after.times.tobytes() == before.times.tobytes()
    assert after.values[5] == 10.0 and math.isnan(after.values[7])
