"""``Monitor.on_alert`` callbacks receive the step at which the service's alert fired."""

from __future__ import annotations

import torch
from helpers.server import thread_server

from logitwatch.agent.monitoring.actions import AlertDispatcher, LocalGuard
from logitwatch.agent.monitoring.monitor import Monitor
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sink import series_key
from logitwatch.service.app import create_app
from logitwatch.service.settings import load_settings
from logitwatch.service.store.db import upgrade


def test_callbacks_get_the_services_fired_step(tmp_path):
    """Attention logits far above 100 from the first step: attn-logit-high begins at step 0
    and, needing two points, fires at step 1; the callback is told both."""
    db = f"sqlite:///{tmp_path / 'lw.db'}"
    upgrade(db)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2))
    with torch.no_grad():  # q and k 100x their size: |q.k|/sqrt(d) in the thousands
        for name, p in model.named_parameters():
            if name.endswith(("wq.weight", "wk.weight")):
                p.mul_(100.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the logits stay where they are
    got: list[dict] = []
    server = thread_server(create_app(load_settings(db_url=db)))
    with server as srv, Monitor(model, opt, run="fired", server=srv.url, every=1) as monitor:
        monitor.on_alert(got.append)
        for step in range(4):
            idx = torch.randint(0, 64, (2, 16))
            ce, _ = loss_fn(model(idx), idx, z_loss=0.0)
            ce.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(step, loss=ce)
            monitor.flush(10)  # the answer (with its alerts) is back before the next step
    high = [a for a in got if a["rule"] == "attn-logit-high"]
    assert high, [a["rule"] for a in got]
    assert all((a["first_step"], a["fired_step"]) == (0, 1) for a in high)


def test_alerts_without_a_fired_step_get_their_first_step():
    """An older service (or rank 0's relay under torch.distributed) sends first_step only."""
    dispatcher, got = AlertDispatcher(), []
    dispatcher.add(got.append)
    dispatcher.notify({"rule": "r", "severity": "warning", "first_step": 7})
    dispatcher.run_pending(8)
    dispatcher.run([{"rule": "s", "severity": "warning", "first_step": 9}], 10)
    assert [a["fired_step"] for a in got] == [7, 9]
    guard = LocalGuard()
    guard.log(3, {series_key("loss"): float("nan")})
    assert guard.firing_alerts()[0]["fired_step"] == 3
