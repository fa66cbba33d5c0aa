"""Feeding batches through the store and a rule engine in one transaction, as POST points does."""

from __future__ import annotations

from logitwatch.protocol import Batch, Series, series_from_columns
from logitwatch.service import store
from logitwatch.service.rules.alerts import list_alerts

__all__ = ["Feeder", "S", "alerts"]


def S(metric: str, steps, values, **labels) -> Series:
    return series_from_columns(metric, labels, steps, values)


def alerts(sm, run: str) -> list[dict]:
    with sm() as s:
        return list_alerts(s, run=run)


class Feeder:
    """Stores batches of one run and runs an engine over them; returns the firing alerts."""

    def __init__(self, sm, engine, run: str) -> None:
        self.sm, self.engine, self.run, self.seq = sm, engine, run, 0

    def config(self, config: dict) -> None:
        with self.sm() as s:
            store.upsert_run(s, name=self.run, config=config)
            s.commit()

    def send(self, *series: Series, segment: int = 0, seq: int | None = None) -> list[dict]:
        self.seq += 1
        batch = Batch("c", self.seq if seq is None else seq, segment, list(series))
        with self.sm() as s:
            if not store.ingest_batch(s, run=self.run, batch=batch).duplicate:
                self.engine.on_batch(s, run=self.run, batch=batch)
            out = self.engine.firing(s, run=self.run)
            s.commit()
        return out
