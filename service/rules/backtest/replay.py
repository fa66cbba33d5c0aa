"""The service's own rule engine over a throwaway SQLite database, fed as the ingest route feeds it.

Each batch goes through prepare_batch and RuleEngine.ingest (store, then evaluate), and a group of
batches commits in one write transaction, as the ingest route's group commit does (see
api/ingest.py); the alerts are then read back from the alert table. The database lives in a temporary folder, deleted on close.
"""

from __future__ import annotations

import fnmatch
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from logitwatch.service.rules.alerts import list_alerts
from logitwatch.service.rules.backtest.score import SEVERITIES, label_run, score
from logitwatch.service.rules.backtest.sources import StoredRun
from logitwatch.service.rules.builtin import builtin_rules
from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.rules.model import Rule, RuleError, check_references
from logitwatch.service.rules.user import put_user_rules
from logitwatch.service.store import prepare_batch, upsert_run
from logitwatch.service.store.db import Writer, make_engine, make_sessionmaker, upgrade

__all__ = ["Replay", "backtest"]

_ALL = 10_000_000  # list_alerts' limit: every alert of a run
_GROUP = 64  # batches per transaction


class Replay:
    """Replays runs through the built-in rules, replaced or extended by ``rules`` as
    ``serve --rules`` would (only ``rules`` with ``builtins=False``).

    >>> with Replay() as replay:  # doctest: +SKIP
    ...     alerts = replay.run(from_file("run.jsonl"))
    """

    def __init__(self, rules: list[Rule] | None = None, *, builtins: bool = True) -> None:
        rules = list(rules or [])
        try:
            check_references(rules, builtin_rules() if builtins else [])
        except RuleError as exc:
            raise ValueError(f"--rules: {exc}") from None
        self._dir = tempfile.TemporaryDirectory(prefix="logitwatch-backtest-")
        url = f"sqlite:///{Path(self._dir.name) / 'backtest.db'}"
        try:
            upgrade(url)
            self._engine = make_engine(url)
        except BaseException:
            self._dir.cleanup()
            raise
        self._reads = make_sessionmaker(self._engine)
        self._writer = Writer(self._engine, self._reads)
        self.engine = RuleEngine(self._writer.sessionmaker, builtins=builtins)
        if rules:
            with self._writer() as session:
                put_user_rules(session, rules=rules, source="backtest")
                session.commit()

    def rules(self) -> list[Rule]:
        """The effective rule set every run is replayed through."""
        with self._reads() as session:
            return list(self.engine.rules(session))

    def run(
        self, run: StoredRun, *, progress: Callable[[int, int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Replay one run (a name not replayed before); its alerts, oldest first."""
        with self._writer() as session:
            upsert_run(session, name=run.name, config=run.config, tags=run.tags)
            session.commit()
        if progress is not None:
            progress(0, len(run.batches))
        # Like the service's group commit: several batches, each stored then evaluated, in one
        # transaction (the rule state each batch leaves is read back by the next one).
        for start in range(0, len(run.batches), _GROUP):
            with self._writer() as session:
                for batch in run.batches[start : start + _GROUP]:
                    prepared = prepare_batch(batch, postgres=False)
                    self.engine.ingest(session, run=run.name, batch=batch, prepared=prepared)
                session.commit()
            if progress is not None:
                progress(min(start + _GROUP, len(run.batches)), len(run.batches))
        with self._reads() as session:
            return list_alerts(session, run=run.name, limit=_ALL)[::-1]

    def close(self) -> None:
        self._engine.dispose()
        self._dir.cleanup()

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backtest(
    runs: list[StoredRun],
    *,
    rules: list[Rule] | None = None,
    builtins: bool = True,
    diverged: dict[str, int] | None = None,
    healthy: Iterable[str] = (),
    min_severity: str = "warning",
    progress: Callable[[StoredRun, int, int], None] | None = None,
) -> dict[str, Any]:
    """Replay ``runs`` through the rule set and score them (see score.py for the figures).

    ``diverged`` maps run names to their divergence step; ``healthy`` holds run names or
    globs. ``progress(run, batches_done, batches)`` is called as each run is replayed.
    """
    if min_severity not in SEVERITIES:
        raise ValueError(f"min_severity must be one of {', '.join(SEVERITIES)}: {min_severity!r}")
    diverged, healthy = dict(diverged or {}), list(healthy)
    names = [r.name for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"runs given twice (one name, two inputs): {', '.join(twice)}")
    unknown = sorted(set(diverged) - set(names))
    if unknown:
        raise ValueError(f"--diverged names no run given: {', '.join(unknown)}")
    for pattern in healthy:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"--healthy {pattern!r} matches no run given")
    well = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in healthy)}
    if well & set(diverged):
        raise ValueError(
            f"runs marked diverged and healthy: {', '.join(sorted(well & set(diverged)))}"
        )
    results = []
    with Replay(rules, builtins=builtins) as replay:
        for run in runs:
            tick = None if progress is None else (lambda i, n, run=run: progress(run, i, n))
            alerts = replay.run(run, progress=tick)
            results.append(label_run(run, alerts, diverged=diverged, healthy=well))
        effective = replay.rules()
    return score(effective, results, min_severity=min_severity)
