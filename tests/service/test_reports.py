"""Reports (store/reports.py): a batch of one point per series is one row until it becomes chunks.

Every read must answer as if each point had been a chunk of its own: a run fed reports (mixed
with ordinary batches that rewrite steps, a second segment, a step sent twice, reports with
and without times) reads the same as a run fed the same points one series a batch, before the
reports become chunks and after. Then: the Compactor turns them into chunks, the migration
writes them back as chunks on downgrade, and storage stats count them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers.pg import database_url
from sqlalchemy import func, select, text

from logitwatch.protocol import Batch, series_from_columns
from logitwatch.service import store
from logitwatch.service.store import reports
from logitwatch.service.store import stats as store_stats
from logitwatch.service.store.compact import Compactor, compact_all, flush_after
from logitwatch.service.store.db import Writer, make_engine, make_sessionmaker, upgrade
from logitwatch.service.store.models import Chunk, Report

LABELS = [{"layer": str(i)} for i in range(10)]


def _report(step: int, value: float, *, timed: bool = True) -> list:
    """One step of the 11 series: loss and attn.entropy_min of 10 layers."""
    t = [1e9 + step] if timed else []
    out = [series_from_columns("loss", {}, [step], [value], t)]
    out += [
        series_from_columns("attn.entropy_min", lab, [step], [value + i], t)
        for i, lab in enumerate(LABELS)
    ]
    return out


def _feed() -> list[tuple[int, list]]:
    """(segment, series) of each batch a run is sent, oldest first."""
    batches = [(0, _report(s, float(s))) for s in range(40)]
    # An ordinary batch rewrites steps 10..14 of layer 3 (after the reports of those steps).
    rewrite = series_from_columns("attn.entropy_min", LABELS[3], range(10, 15), [-1.0] * 5)
    batches.append((0, [rewrite]))
    batches += [(0, _report(s, float(s))) for s in range(40, 60)]
    batches.append((0, _report(50, 500.0)))  # step 50 again: the later report wins
    batches.append((0, _report(60, 60.0, timed=False)))  # no times
    batches.append((0, [series_from_columns("loss", {}, [61, 62], [61.0, float("nan")])]))
    batches += [(1, _report(s, 1000.0 + s)) for s in range(30, 36)]  # a resume: segment 1
    batches.append((0, _report(63, float("inf"))))  # a late batch of segment 0
    return batches


def _send(sessions, run: str, *, alone: bool) -> list[store.IngestResult]:
    """Store _feed() for `run`: as it comes (reports), or each series in a batch of its own."""
    results, seq = [], 0
    with sessions() as s:
        for segment, series in _feed():
            for part in [[x] for x in series] if alone else [series]:
                seq += 1
                results.append(store.ingest_batch(s, run=run, batch=Batch("c", seq, segment, part)))
        s.commit()
    return results


def _rows(result) -> list:
    """A read's answer without series ids (they differ between runs), NaN-safe."""
    out = []
    for x in result.series:
        cols = {k: getattr(x, k) for k in x.__slots__ if k not in ("series_id",)}
        out.append({k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in cols.items()})
    return out


READS = [
    {"metric": "loss"},
    {"metric": "loss", "segments_all": True},
    {"metric": "loss", "times": False},
    {"metric": "attn.entropy_min"},
    {"metric": "attn.entropy_min", "labels": {"layer": "3"}, "start": 8, "end": 52},
    {"metric": "attn.entropy_min", "segments_all": True, "start": 33},
    {"metric": "attn.entropy_min", "max_points": 7},
    {"metric": "attn.entropy_min", "max_points": 5, "segments_all": True, "end": 45},
    {"metric": "loss", "max_points": 1000},
]


def _reads(sessions, run: str) -> list:
    with sessions() as s:
        out = [_rows(store.read_points(s, run=run, **kw)) for kw in READS]
        pages, cursor = [], None
        while True:
            page = store.read_points(s, run=run, metric="attn.entropy_min", limit=37, cursor=cursor)
            pages.append(_rows(page))
            if not (cursor := page.next_cursor):
                break
        return [*out, pages]


def test_reports_read_as_the_same_points_sent_one_series_a_batch(sessions, run_name):
    fast = _send(sessions, f"{run_name}-fast", alone=False)
    _send(sessions, f"{run_name}-plain", alone=True)
    assert sum(r.report for r in fast) == len(_feed()) - 2  # all but the two ordinary batches
    run_id = fast[0].run_id
    with sessions() as s:
        left = s.scalar(select(func.count()).where(Report.run_id == run_id))
    assert left == 7  # the reports after the ordinary batch of steps 61-62 (flushed by it)
    expected = _reads(sessions, f"{run_name}-plain")
    assert _reads(sessions, f"{run_name}-fast") == expected
    # Turned into chunks (and merged), the same answers.
    compact_all(sessions, run=f"{run_name}-fast", min_chunks=1_000_000)
    with sessions() as s:
        assert s.scalar(select(func.count()).where(Report.run_id == run_id)) == 0
    assert _reads(sessions, f"{run_name}-fast") == expected
    compact_all(sessions, run=f"{run_name}-fast")
    assert _reads(sessions, f"{run_name}-fast") == expected


def test_a_flush_writes_each_series_once_per_segment_with_the_later_value(sessions, run_name):
    with sessions() as s:
        results = [
            store.ingest_batch(s, run=run_name, batch=Batch("c", i, seg, _report(step, v)))
            for i, (seg, step, v) in enumerate(
                [(0, 5, 1.0), (0, 3, 2.0), (0, 5, 3.0), (2, 5, 4.0), (0, 4, 5.0)]
            )
        ]
        run_id = results[0].run_id
        keys = reports.flush(s, [run_id])
        assert sorted(keys) == sorted({(sid, g) for sid in results[0].series_ids for g in (0, 2)})
        assert reports.flush(s, [run_id]) == []  # nothing left
        sid = min(results[0].series_ids)  # loss
        q = select(Chunk.segment, Chunk.step_min, Chunk.step_max, Chunk.n).where(
            Chunk.series_id == sid
        )
        assert sorted(s.execute(q).all()) == [(0, 3, 5, 3), (2, 5, 5, 1)]
        s.commit()
    (got,) = store.read_points(sessions(), run=run_name, metric="loss", segments_all=True).series[
        :1
    ]
    assert got.segment == 0 and got.steps.tolist() == [3, 4, 5]
    assert got.values.tolist() == [2.0, 5.0, 3.0]  # step 5: the later report of segment 0


def test_the_compactor_flushes_a_run_with_enough_reports_and_those_left_at_start(
    sessions, run_name
):
    def count(model, run_id):
        with sessions() as s:
            return s.scalar(select(func.count()).select_from(model).where(model.run_id == run_id))

    # Written as the service writes beside its compactor: through the process's writer
    # (SQLite: BEGIN IMMEDIATE under the lock the compactor takes). A plain deferred
    # transaction that reads first fails at its first write ("database is locked") when the
    # compactor commits in between, as SQLite's WAL mode says it must.
    writer = Writer(sessions.kw["bind"], sessions)
    # Reports left by an earlier process: flushed at the first deep idle.
    with writer() as s:
        r = store.ingest_batch(s, run=f"{run_name}-old", batch=Batch("c", 1, 0, _report(1, 1.0)))
        s.commit()
    compactor = Compactor(writer.sessionmaker, writer.lock, idle_s=0.05, deep_idle_s=0.3)
    compactor.start()
    try:
        deadline = time.monotonic() + 20
        while count(Report, r.run_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count(Report, r.run_id) == 0
        # A run is flushed without waiting for quiet, every flush_after(run) reports.
        step, sizes = 0, []
        for _ in range(2):
            while True:
                with writer() as s:
                    b = Batch("c", step, 0, _report(step, float(step)))
                    r = store.ingest_batch(s, run=run_name, batch=b)
                    s.commit()
                assert r.report
                step += 1
                compactor.touch_report(r.run_id)
                if step - sum(sizes) == flush_after(r.run_id):
                    break
            sizes.append(step - sum(sizes))
            deadline = time.monotonic() + 20
            while count(Report, r.run_id) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert count(Report, r.run_id) == 0
    finally:
        compactor.close()
    assert reports.FLUSH_REPORTS // 2 <= sizes[0] <= reports.FLUSH_REPORTS
    (got,) = store.read_points(sessions(), run=run_name, metric="loss").series
    assert got.steps.tolist() == list(range(step))
    with sessions() as s:
        chunks = s.execute(select(Chunk.n).where(Chunk.series_id == got.series_id)).scalars()
        assert list(chunks) == sizes


def test_storage_stats_count_the_points_of_reports(sessions, run_name):
    with sessions() as s:
        before = store_stats.storage_stats(s).points
        store.ingest_batch(s, run=run_name, batch=Batch("c", 1, 0, _report(1, 1.0)))
        s.commit()
        assert store_stats.storage_stats(s).points == before + 11


def _downgrade(url: str, revision: str) -> None:
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

    import logitwatch.service.store.db as db

    here = Path(db.__file__).resolve().parent
    cfg = Config(str(here / "alembic.ini"))
    cfg.set_main_option("script_location", str(here / "migrations"))
    cfg.attributes["url"] = url
    command.downgrade(cfg, revision)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_downgrade_writes_reports_back_as_one_point_chunks(kind, tmp_path):
    with database_url(kind, tmp_path, "lwtest_reports") as url:
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        try:
            with sessions() as s:
                for i, timed in enumerate([True, False]):
                    b = Batch("c", i, 0, _report(i, 2.0 + i, timed=timed))
                    store.ingest_batch(s, run="r", batch=b)
                s.commit()
            _downgrade(url, "0006_alerts_view_fired_step")
            with engine.connect() as conn:
                assert not engine.dialect.has_table(conn, "reports")
                rows = conn.execute(
                    text("SELECT n, step_min, step_max FROM chunks ORDER BY id")
                ).all()
            assert rows == [(1, 0, 0)] * 11 + [(1, 1, 1)] * 11
            upgrade(url)
            with sessions() as s:
                (got,) = store.read_points(s, run="r", metric="loss").series
                assert got.steps.tolist() == [0, 1] and got.values.tolist() == [2.0, 3.0]
                assert got.times[0] == 1e9 and np.isnan(got.times[1])
        finally:
            engine.dispose()


def test_grafana_functions_read_reports_on_postgresql(tmp_path):
    with database_url("postgresql", tmp_path, "lwtest_reports_views") as url:
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        try:
            with sessions() as s:
                for i, (seg, step, v) in enumerate([(0, 1, 1.0), (0, 2, 2.0), (0, 2, 5.0)]):
                    store.ingest_batch(s, run="r", batch=Batch("c", i, seg, _report(step, v)))
                # An ordinary batch flushes them; then one more report rewrites step 1.
                store.ingest_batch(
                    s,
                    run="r",
                    batch=Batch("c", 9, 0, [series_from_columns("loss", {}, [3], [3.0])]),
                )
                store.ingest_batch(s, run="r", batch=Batch("c", 10, 0, _report(1, 9.0)))
                s.commit()
                assert s.scalar(select(func.count()).select_from(Report)) == 1
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT step, value FROM logitwatch_points('r', 'loss') ORDER BY step")
                ).all()
            assert [tuple(r) for r in rows] == [(1, 9.0), (2, 5.0), (3, 3.0)]
        finally:
            engine.dispose()


def test_a_read_shows_a_batch_committed_during_it_whole_or_not_at_all(
    sessions, client, run_name, monkeypatch
):
    """GET points reads a run's reports, then its chunks. A batch committed between the two
    statements (it flushes the reports into chunks, rewrites step 5 and adds step 7) must show
    entirely or not at all: under PostgreSQL's READ COMMITTED the read showed step 5's old
    value beside the new step 7, a state the database never held."""
    from logitwatch.service.store import read as store_read

    with sessions() as s:
        for step in range(6):  # reports of steps 0-5: layer 3 reads step + 3
            store.ingest_batch(s, run=run_name, batch=Batch("c", step, 0, _report(step, step)))
        s.commit()
    rewrite = series_from_columns("attn.entropy_min", LABELS[3], [5, 7], [-1.0, -1.0])
    original, wrote = reports.parts, []

    def parts_then_a_commit(*args, **kwargs):
        found = original(*args, **kwargs)
        if not wrote:  # once, between the read's two statements
            with sessions() as other:
                store.ingest_batch(other, run=run_name, batch=Batch("w", 1, 0, [rewrite]))
                other.commit()
            wrote.append(True)
        return found

    monkeypatch.setattr(store_read.reports, "parts", parts_then_a_commit)
    r = client.get(f"/api/v1/runs/{run_name}/metrics/attn.entropy_min", params={"layer": "3"})
    assert r.status_code == 200, r.text
    assert wrote  # the write did land during the read
    (series,) = r.json()["series"]
    got = dict(zip(series["steps"], series["values"], strict=True))
    before = {step: step + 3.0 for step in range(6)}
    after = {**before, 5: -1.0, 7: -1.0}
    assert got == before  # the read's snapshot predates the write: none of it
    monkeypatch.setattr(store_read.reports, "parts", original)
    r = client.get(f"/api/v1/runs/{run_name}/metrics/attn.entropy_min", params={"layer": "3"})
    (series,) = r.json()["series"]
    assert dict(zip(series["steps"], series["values"], strict=True)) == after


@pytest.mark.parametrize(
    ("values", "times", "sizes"),
    [
        # one step and one time for all, float32 values (NaN and inf too): 8, 4n and 8 bytes
        ([1.5, -2.0, float("nan"), float("inf"), 2.0**100, 0.0, -0.0, 7.0], [5e8] * 8, (8, 32, 8)),
        # a value float32 cannot hold: all of them as float64; times that differ: each one
        ([1.5, 0.1, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [5e8 + i for i in range(8)], (8, 64, 64)),
        ([1.5, 2.0, 1e300, 4.0, 5.0, 6.0, 7.0, 8.0], [], (8, 64, 0)),  # no times
    ],
)
def test_a_report_row_stores_what_its_series_share_once(sessions, run_name, values, times, sizes):
    """SQLite: a report's series share their step (and from the agent their time): the row
    holds it once, and values that are all float32 numbers in 4 bytes each; read back (as
    reports, flushed into chunks) exactly as sent."""
    series = [
        series_from_columns("m", {"i": str(i)}, [7], [v], [times[i]] if times else [])
        for i, v in enumerate(values)
    ]
    with sessions() as s:
        (result,) = [store.ingest_batch(s, run=run_name, batch=Batch("c", 1, 0, series))]
        s.commit()
        assert result.report
        if s.get_bind().dialect.name == "sqlite":
            got = s.execute(
                text('SELECT length(steps), length("values"), length(times) FROM reports')
            ).one()
            assert tuple(got) == sizes

    def read() -> list:
        with sessions() as s:
            out = store.read_points(s, run=run_name, metric="m").series
            return sorted(
                (x.labels["i"], x.steps.tobytes(), x.values.tobytes(), x.times.tobytes())
                for x in out
            )

    want = sorted(
        (str(i), np.array([7]).tobytes(), np.array([v]).tobytes(),
         np.array([times[i]]).tobytes() if times else b"")
        for i, v in enumerate(values)
    )  # fmt: skip
    assert read() == want
    compact_all(sessions, run=run_name, min_chunks=1_000_000)  # the report turned into chunks
    assert read() == want
