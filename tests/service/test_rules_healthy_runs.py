"""Healthy runs recorded from real training replayed through the rule engine: not one warning.

tests/service/data/healthy_runs.json holds the series the rules read (4 significant digits)
of three runs that raised false alarms before the rules measured growth from a meaningful
baseline:

- ``demo-healthy``: ``logitwatch demo``'s healthy run (llama2 preset, warmup + cosine, LR 3e-3,
  150 steps): attn-logit-growth on layer 3 at steps 72-80, its max logit ~20 against a
  baseline taken at ~2 just after warmup.
- ``hf-gpt2-…`` / ``hf-llama-…``: tiny Hugging Face GPT-2 and Llama built from configs, the
  Trainer with LogitwatchCallback at LR 1e-2, no warmup, 100 steps (final losses 3.0 and 2.7):
  growth warnings from step 17 against thresholds of 0.05-0.2 (a baseline at initialisation),
  one head firing and resolving five times, entropy-drop warnings.
- ``hf-gpt2-…-seed1``: the GPT-2 run again with another seed, its attention entropy reported
  every step swinging between 0.2 and 0.6 (dropout 0.1): an entropy-drop warning on noise
  while the drop rule wanted 2 points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers.feed import Feeder, S, alerts

from logitwatch.service.rules.engine import RuleEngine
from logitwatch.service.store.db import WRITE, make_engine, make_sessionmaker

RUNS = json.loads((Path(__file__).parent / "data" / "healthy_runs.json").read_text())


@pytest.fixture
def writer(db_url):
    engine = make_engine(db_url)
    yield make_sessionmaker(engine.execution_options(**{WRITE: True}))
    engine.dispose()


def replay(f: Feeder, run: dict, reports_per_batch: int = 5) -> None:
    """The run's points in step order, a few reports a batch, as the agent sends them."""
    steps = sorted({s for series in run["series"] for s in series["steps"]})
    for i in range(0, len(steps), reports_per_batch):
        lo, hi = steps[i], steps[min(i + reports_per_batch, len(steps)) - 1]
        batch = []
        for series in run["series"]:
            pts = [
                (s, v)
                for s, v in zip(series["steps"], series["values"], strict=True)
                if lo <= s <= hi
            ]
            if pts:
                values = [math.nan if v is None else v for _, v in pts]
                batch.append(S(series["metric"], [s for s, _ in pts], values, **series["labels"]))
        f.send(*batch)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_recorded_healthy_runs_raise_no_warning(writer, run_name, name):
    run = RUNS[name]
    f = Feeder(writer, RuleEngine(writer), run_name)
    f.config(run["config"])
    replay(f, run)
    loud = [(a["rule"], a["labels"], a["first_step"]) for a in alerts(writer, run_name)
            if a["severity"] in ("warning", "critical")]  # fmt: skip
    assert loud == []
    # the runs are what made the old rules fire: attention logits grew 10-100x from their start
    logits = [s["values"] for s in run["series"] if s["metric"] == "attn.logit_max"]
    assert max(max(v) / v[0] for v in logits) > 10
