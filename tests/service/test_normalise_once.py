"""A batch's arrays are sorted and de-duplicated once (store.ingest.series_columns): the rules
evaluate the arrays the store wrote, and a repeated step keeps its last value for both."""

from __future__ import annotations

import math

import pytest
from helpers.feed import S

from logitwatch.protocol import Batch
from logitwatch.service import store
from logitwatch.service.rules import engine as engine_module
from logitwatch.service.rules.alerts import list_alerts
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.store import ingest


def _send(sessions, run: str, batch: Batch, *, prepared: bool) -> list[dict]:
    """Store and evaluate `batch` as POST points does (prepared) or as older callers do."""
    with sessions() as s:
        prep = None
        if prepared:
            prep = store.prepare_batch(batch, postgres=s.get_bind().dialect.name == "postgresql")
        store.ingest_batch(s, run=run, batch=batch, prepared=prep)
        RuleEngine(sessions).on_batch(s, run=run, batch=batch, prepared=prep)
        s.commit()
        return list_alerts(s, run=run)


def test_the_engine_normalises_with_the_stores_function():
    assert engine_module.series_columns is ingest.series_columns


def test_prepare_batch_keeps_every_series_columns_sorted_with_the_last_value():
    batch = Batch("c", 1, 0, [S("loss", [5, 3, 5, 4, 3], [1, 2, 3, 4, 5]), S("lr", [], [])])
    prepared = store.prepare_batch(batch, postgres=False)
    (steps, values, times), empty = prepared.columns
    assert (steps.tolist(), values.tolist(), times.tolist()) == ([3, 4, 5], [5.0, 4.0, 3.0], [])
    assert len(empty.steps) == 0 and [i for i, _, _ in prepared.rows] == [0]


def test_rules_read_the_prepared_columns_and_never_redo_them(sessions, run_name, monkeypatch):
    def again(_series):
        raise AssertionError("the rules normalised a batch that came prepared")

    monkeypatch.setattr(engine_module, "series_columns", again)
    (a,) = _send(
        sessions, run_name, Batch("c", 1, 0, [S("loss", [2, 1], [math.nan, 1.0])]), prepared=True
    )
    assert (a["rule"], a["first_step"]) == ("nonfinite", 2)


@pytest.mark.parametrize("prepared", [True, False])
def test_a_repeated_step_keeps_its_last_value_for_the_rules(sessions, run_name, prepared):
    # loss NaN fires "nonfinite" at once: only the value that step kept may count.
    healed = Batch("c", 1, 0, [S("loss", [2, 1, 2], [math.nan, 1.0, 3.0])])
    assert _send(sessions, run_name, healed, prepared=prepared) == []
    broken = Batch("c", 2, 0, [S("loss", [4, 3, 4], [3.0, 1.0, math.nan])])
    (a,) = _send(sessions, run_name, broken, prepared=prepared)
    assert (a["rule"], a["first_step"], a["value"]) == ("nonfinite", 4, "NaN")
