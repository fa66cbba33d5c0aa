"""A service alert under DDP (2 gloo ranks): rank 0 receives it, both ranks act on it together.

Rank 1 alone reports an absurd loss; rank 0's report carries the mean of both ranks' losses to
a real service, whose rule fires a critical alert back to rank 0 in an ingest answer. Every
rank must then lower its LR, save and stop at the same step.
"""

from __future__ import annotations

import json
import time

import httpx
import torch
from helpers.ranks import spawn_ranks
from helpers.server import live_server

from logitwatch.agent import Monitor, MonitorConfig
from logitwatch.agent.monitoring.actions import Checkpoint, LowerLR, StopTraining
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn

V, T, B, LR = 64, 16, 2, 1e-3
RULE = {
    "name": "loss-high",
    "metric": "loss",
    "condition": {"kind": "threshold", "op": ">", "value": 20},
    "severity": "critical",
    "hint": "test rule",
}


def _worker(rank: int, world: int, url: str, tmp: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        Decoder(DecoderConfig(vocab_size=V, n_layers=2, d_model=32, n_heads=2, max_seq_len=T))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    monitor = Monitor(
        model, opt, run="ddp-actions", server=url, spool_dir=f"{tmp}/spool{rank}",
        config=MonitorConfig(every=1, close_timeout_s=5),
    )  # fmt: skip
    saves, lrs, stop, step = [], [], None, 0
    monitor.on_alert(LowerLR(opt, 0.5))
    monitor.on_alert(Checkpoint(lambda alert: saves.append([step, alert["rule"]])))
    monitor.on_alert(StopTraining())
    for step in range(400):  # the closure above reads step
        torch.manual_seed(1000 * step + rank)
        idx = torch.randint(0, V, (B, T))
        ce, _ = loss_fn(model(idx), idx, z_loss=0.0)
        ce.backward()
        opt.step()
        opt.zero_grad()
        loss = torch.tensor(100.0) if rank == 1 and step >= 3 else ce.detach()
        monitor.step(step, loss=loss, tokens=idx.numel())
        lrs.append(opt.param_groups[0]["lr"])
        if monitor.should_stop:
            stop = step
            break
        time.sleep(0.05)  # the alert rides an ingest answer: about a second
    monitor.close()
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump({"stop": stop, "lrs": lrs, "saves": saves}, f)


def test_a_service_alert_stops_every_rank_at_the_same_step_with_equal_lrs(tmp_path):
    with live_server(f"sqlite:///{tmp_path}/lw.db") as server:
        r = httpx.put(f"{server.url}/api/v1/rules", json={"rules": [RULE]}, timeout=30)
        assert r.status_code == 200, r.text
        spawn_ranks(_worker, server.url, str(tmp_path), timeout=300)
        alerts = httpx.get(
            f"{server.url}/api/v1/alerts", params={"run": "ddp-actions"}, timeout=30
        ).json()["alerts"]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # The rule saw rank 1's loss in rank 0's report (the mean of both), from step 3 on.
    (fired,) = [a for a in alerts if a["rule"] == "loss-high"]
    assert fired["first_step"] == 3 and fired["severity"] == "critical"
    stop = r0["stop"]
    assert stop is not None and stop == r1["stop"] and stop > 3
    # The LR is equal on both ranks at every step, and lowered once (the cooldown).
    assert r0["lrs"] == r1["lrs"] and len(r0["lrs"]) == stop + 1
    assert r0["lrs"][:4] == [LR] * 4 and set(r0["lrs"]) == {LR, LR / 2}
    # Both saved at the step they stopped, for the same rule (rank 1 learnt its name from rank 0).
    assert r0["saves"] == r1["saves"] == [[stop, "loss-high"]]
