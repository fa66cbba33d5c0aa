"""`logitwatch demo`'s healthy run, trained by the demo's own code into a real service: silent.

The demo's trainer command with fewer steps (the demo's --steps; the same preset, seed, schedule
shape and reporting interval). The full 150-step run is replayed from a recording in
tests/service/test_rules_healthy_runs.py, where the old rules fired three warnings.
"""

from __future__ import annotations

from helpers.server import live_server

from logitwatch import demo
from logitwatch.client import ApiClient

STEPS = 40


def test_the_demos_healthy_run_raises_no_warning_and_no_critical(tmp_path):
    log = tmp_path / "healthy.log"
    with live_server(f"sqlite:///{tmp_path / 'lw.db'}") as server:
        trainer = demo._start_trainer(server.url, demo.HEALTHY, STEPS, demo.HEALTHY_FLAGS, log)
        try:
            code = trainer.wait(timeout=300)
        finally:
            if trainer.poll() is None:
                trainer.kill()
        assert code == 0, log.read_text()[-2000:]
        with ApiClient(server.url) as api:
            alerts = api.alerts(run=demo.HEALTHY)
            series = {
                (s["metric"], tuple(sorted(s["labels"].items()))): s
                for s in api.series(demo.HEALTHY)
            }
    loud = [(a["rule"], a["labels"], a["first_step"]) for a in alerts
            if a["severity"] in ("warning", "critical")]  # fmt: skip
    assert loud == []
    # every report arrived (the demo reports every 2 steps), attention probes included
    assert series[("loss", ())]["last_step"] == STEPS - 2
    heads = [s for (metric, _), s in series.items() if metric == "attn.logit_max"]
    assert len(heads) == 16 and all(s["last_step"] == STEPS - 2 for s in heads)
