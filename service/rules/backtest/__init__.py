"""Backtests: stored runs replayed through a rule set on a throwaway database, scored per rule."""

from logitwatch.service.rules.backtest.replay import Replay, backtest
from logitwatch.service.rules.backtest.score import ANY, SEVERITIES, RunResult, score
from logitwatch.service.rules.backtest.sources import StoredRun, from_file, from_service

__all__ = [
    "ANY",
    "SEVERITIES",
    "Replay",
    "RunResult",
    "StoredRun",
    "backtest",
    "from_file",
    "from_service",
    "score",
]
