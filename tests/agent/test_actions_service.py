"""A service alert reaches the training loop: `train --on-alert lower-lr` against a real server."""

from __future__ import annotations

import time

import httpx
from helpers.server import live_server

from logitwatch.agent.reference.train import TrainConfig, train
from logitwatch.schedules import lr_at


def test_an_attention_alert_from_the_service_lowers_the_lr_once(tmp_path):
    with live_server(f"sqlite:///{tmp_path}/lw.db") as server:
        cfg = TrainConfig(
            preset=None, model=dict(n_layers=1, d_model=32, n_heads=2), qk_norm=False, lr=1e-1,
            steps=80, batch_size=4, seq_len=32, corpus_bytes=50_000, eval_batches=0,
            progress=False, device="cpu", every=4, server=server.url, run="act",
            spool=str(tmp_path / "spool"), on_alert=("lower-lr",),
        )  # fmt: skip
        # The alert travels back in an ingest answer (the sender posts about once a second):
        # pace the steps so that a loaded machine still gives it time to arrive mid-run.
        result = train(cfg, callbacks=[lambda info: time.sleep(0.05)])
        alerts = httpx.get(f"{server.url}/api/v1/alerts", params={"run": "act"}).json()["alerts"]
    assert any(a["rule"].startswith("attn-") for a in alerts)
    first = min(a["first_step"] for a in alerts if a["severity"] in ("warning", "critical"))
    # The LR each step used, over what the schedule says: 1 until the alert came back, then 0.5
    # (the cooldown keeps a burst of alerts from the same cause to a single cut).
    schedule = cfg.schedule_config()
    ratios = [round(lr / lr_at(schedule, s), 3) for s, lr in enumerate(result.lrs)]
    cut = ratios.index(0.5)
    assert first < cut and set(ratios[:cut]) == {1.0} and set(ratios[cut:]) == {0.5}
