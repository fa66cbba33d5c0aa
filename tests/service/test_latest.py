"""Latest points with reports: the latest table lags a run's unflushed reports, and readers
(series list, run summary, /metrics gauges) put those over it. What they show before a flush
must equal what they show after it, and a reference kept in Python, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import numpy as np
import pytest

from logitwatch.protocol import Batch, series_from_columns
from logitwatch.service import store
from logitwatch.service.api import prom
from logitwatch.service.api.prom import LatestCollector
from logitwatch.service.store import latest, reports
from logitwatch.service.store.models import Report, Run

N_SERIES = 10  # a report needs at least 8 series (ingest._one_point)


def _series_of(i: int) -> tuple[str, dict[str, str]]:
    return ("attn.logit_max", {"layer": str(i), "head": "0"}) if i else ("loss", {})


class Reference:
    """The latest table's rule, kept in Python: the largest (segment, step) wins, a later
    write wins a tie; every point received counts; the smallest step of any segment."""

    def __init__(self) -> None:
        self.rows: dict[int, list] = {}

    def add(self, i: int, segment: int, steps, values, times) -> None:
        for k, (step, value) in enumerate(zip(steps, values, strict=True)):
            t = times[k] if times else None
            row = self.rows.get(i)
            if row is None:
                self.rows[i] = [segment, step, value, t, 1, step]
                continue
            if (segment, step) >= (row[0], row[1]):
                row[:4] = [segment, step, value, t]
            row[4] += 1
            row[5] = min(row[5], step)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _check(sessions, run: str, ref: Reference) -> None:
    if not ref.rows:
        return  # the run is made by its first batch
    with sessions() as s:
        got = {(i.metric, i.labels.get("layer")): i for i in store.list_series(s, run=run)}
        info = store.get_run(s, name=run)
    for i, (seg, step, value, t, n, first) in ref.rows.items():
        metric, labels = _series_of(i)
        g = got[(metric, labels.get("layer"))]
        assert (g.last_segment, g.last_step, g.last_time, g.n_points, g.first_step) == (
            seg,
            step,
            t,
            n,
            first,
        ), (i, g)
        assert _same(g.last_value, value), (i, g.last_value, value)
    assert (info.max_segment, info.last_step) == max((r[0], r[1]) for r in ref.rows.values())


def _gauges(collector: LatestCollector) -> dict[tuple, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in collector.collect()
        for sample in metric.samples
        if not sample.name.endswith("seen_timestamp_seconds")
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_readers_put_unflushed_reports_over_the_latest_table(sessions, run_name, seed):
    rng = random.Random(seed)
    ref = Reference()
    segment, step, seq = 0, 0, 0
    for _ in range(40):
        seq += 1
        kind = rng.random()
        if kind < 0.1:
            segment += 1  # a restart: steps begin again
            step = rng.randrange(0, 5)
        elif kind < 0.2:
            with sessions() as s:  # what the compactor does
                run_id = s.query(Run.id).filter(Run.name == run_name).scalar()
                reports.flush(s, [run_id] if run_id else [])
                s.commit()
            _check(sessions, run_name, ref)
            continue
        late = rng.random() < 0.2  # a late or repeated step
        at = max(0, step - rng.randrange(0, 4)) if late else step + 1
        step = max(step, at)
        timed = rng.random() < 0.7
        if rng.random() < 0.15:  # a batch of several points a series: chunks, flushes reports
            picks = sorted(rng.sample(range(N_SERIES), 3))
            series = []
            for i in picks:
                steps = [at, at + 1]
                values = [rng.random(), math.nan if rng.random() < 0.3 else rng.random()]
                times = [1e9 + seq, 1e9 + seq + 0.5] if timed else []
                series.append(series_from_columns(*_series_of(i), steps, values, times))
                ref.add(i, segment, steps, values, times)
            step = max(step, at + 1)
        else:
            series = []
            for i in range(N_SERIES):
                value = math.nan if rng.random() < 0.1 else rng.random()
                times = [1e9 + seq] if timed else []
                series.append(series_from_columns(*_series_of(i), [at], [value], times))
                ref.add(i, segment, [at], [value], times)
        with sessions() as s:
            assert not store.ingest_batch(
                s, run=run_name, batch=Batch("c", seq, segment, series)
            ).duplicate
            s.commit()
        _check(sessions, run_name, ref)

    with sessions() as s:
        s.query(Run).filter(Run.name == run_name).update({Run.last_seen_at: datetime.now(UTC)})
        s.commit()
    collector = LatestCollector(sessions, inactive_after_s=3600)  # one, as the service has
    before = _gauges(collector)
    with sessions() as s:
        run_id = s.query(Run.id).filter(Run.name == run_name).scalar()
        pending = s.query(Report).filter(Report.run_id == run_id).count()
        reports.flush(s, [run_id])
        s.commit()
    _check(sessions, run_name, ref)
    after = _gauges(collector)
    assert pending > 0  # the gauges before were read with reports over the table
    want = {_series_of(i)[1].get("layer", ""): r[2] for i, r in ref.rows.items()}
    for gauges in (before, after):
        mine = {
            dict(labels).get("layer", ""): v
            for (_, labels), v in gauges.items()
            if dict(labels).get("run") == run_name
        }
        assert mine.keys() == want.keys()
        assert all(_same(mine[k], want[k]) for k in want), (mine, want)


@pytest.mark.parametrize("forward", [True, False])
def test_newest_of_report_rows_matches_the_rule_point_by_point(forward):
    """Rows that only step forward (the sort by series id alone) and rows that reach back
    (late steps, series at steps of their own, a later write of the same step, segments
    out of order: the full sort)."""
    rng = random.Random(7 + forward)
    for _ in range(50):
        parts, ref, step = [], Reference(), 0
        for _ in range(rng.randrange(1, 12)):
            segment = 0 if forward else rng.randrange(0, 2)
            step = step + rng.randrange(1, 3) if forward else rng.randrange(0, 6)
            sids = sorted(rng.sample(range(20), rng.randrange(1, 8)))
            # A report's series may each be at a step of their own.
            steps = [step if forward else rng.randrange(0, 6) for _ in sids]
            times = [1e9 + st for st in steps] if rng.random() < 0.5 else []
            values = [rng.random() for _ in sids]
            parts.append(
                (
                    segment,
                    np.array(sids, dtype=np.int64),
                    np.array(steps, dtype=np.int64),
                    np.array(values),
                    np.array(times),
                )
            )
            for k, sid in enumerate(sids):
                ref.add(sid, segment, [steps[k]], [values[k]], times[k : k + 1])
        got = latest.newest(parts)
        assert got == {sid: latest.Newest(*row) for sid, row in ref.rows.items()}


@pytest.mark.parametrize("shape", ["fleet", "late", "subsets", "segments", "mixed"])
def test_metrics_read_of_reports_equals_the_full_summary(sessions, run_name, shape, monkeypatch):
    """pending_values (what /metrics reads: a fleet run's newest report alone) gives each
    series' newest point as pending_latest does from every row, whichever rows a run has.
    One row is read where every report carries one set of series at one step: a fleet's,
    with late steps or a restart's new segment too (the largest segment, step and write
    then holds every newest point). Every row is read for reports of other series sets, or
    whose series are at steps of their own."""
    rng = random.Random(shape)
    runs = [f"{run_name}-{i}" for i in range(3)]
    for r, run in enumerate(runs):
        step, segment = 10, 0
        for seq in range(12):
            step += 1
            odd = r != 1  # one run of three stays a fleet's
            if shape == "late" and seq == 7 and odd:
                step -= 5
            if shape == "segments" and seq == 6 and odd:
                segment, step = 1, 0
            picks = range(N_SERIES)
            if shape == "subsets" and odd:  # the last report lacks two series
                picks = sorted(rng.sample(range(N_SERIES), 8 + (seq + 1) % 3))
            steps = [step] * N_SERIES
            if shape == "mixed" and seq == 11 and odd:  # half the series a step of their own
                steps = [step if i % 2 else step - 8 for i in range(N_SERIES)]
            series = [
                series_from_columns(*_series_of(i), [steps[i]], [rng.random()], []) for i in picks
            ]
            with sessions() as s:
                store.ingest_batch(s, run=run, batch=Batch("c", seq, segment, series))
                s.commit()
    read = []
    arrays = reports._arrays
    monkeypatch.setattr(reports, "_arrays", lambda *a: read.append(1) or arrays(*a))
    with sessions() as s:
        ids = [s.query(Run.id).filter(Run.name == run).scalar() for run in runs]
        fast = reports.pending_values(s, ids)
        fast_rows = len(read)
        full = reports.pending_latest(s, ids)
    assert len(full) == 3 * N_SERIES
    assert fast == {sid: (n.segment, n.step, n.value) for sid, n in full.items()}
    one_row = shape in ("fleet", "late", "segments")
    assert fast_rows == (3 if one_row else 1 + 2 * 12)  # rows whose payload was read


@pytest.mark.parametrize("lookup", ["by id", "all active", "full cache"])
def test_one_collector_learns_the_labels_of_series_made_after_its_first_scrape(
    sessions, run_name, lookup, monkeypatch
):
    """New series' labels looked up by id (a few), with every active series (many), or all
    again into a new dict (the cache at its bound)."""
    monkeypatch.setattr(prom, "_LEARN_BY_ID", 0 if lookup == "all active" else 500)
    monkeypatch.setattr(prom, "_MAX_KEYS", 4 if lookup == "full cache" else 1_000_000)
    collector = LatestCollector(sessions, inactive_after_s=3600)

    def post(seq: int, layers: int) -> None:
        series = [series_from_columns(*_series_of(i), [seq], [float(i)], []) for i in range(layers)]
        with sessions() as s:
            store.ingest_batch(s, run=run_name, batch=Batch("c", seq, 0, series))
            s.query(Run).filter(Run.name == run_name).update({Run.last_seen_at: datetime.now(UTC)})
            s.commit()

    def mine() -> dict[str, float]:
        return {
            dict(labels).get("layer", ""): v
            for (_, labels), v in _gauges(collector).items()
            if dict(labels).get("run") == run_name
        }

    post(0, 3)
    assert mine() == {"": 0.0, "1": 1.0, "2": 2.0}
    post(1, 5)  # two series more, after the collector cached the first three's labels
    assert mine() == {"": 0.0, "1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0}
