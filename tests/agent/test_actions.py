"""Alert actions in the training process: dispatch at step boundaries, the built-ins, the local guard."""

from __future__ import annotations

import threading

import pytest
import torch

from logitwatch.agent.monitoring.actions import (
    AlertDispatcher,
    Checkpoint,
    LocalGuard,
    LowerLR,
    StopTraining,
    install_actions,
)
from logitwatch.agent.monitoring.monitor import Monitor
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.reference.schedule import WarmupCosine
from logitwatch.agent.transport.sink import MemorySink, series_key


def alert(severity="warning", rule="attn-logit-high", ident=1, step=10):
    return {"id": ident, "rule": rule, "severity": severity, "labels": {"layer": "0"},
            "first_step": step}  # fmt: skip


def test_callbacks_run_on_the_calling_thread_only_at_a_step_boundary():
    dispatcher, calls = AlertDispatcher(), []
    dispatcher.add(lambda a: calls.append((a["rule"], threading.current_thread().name)))
    worker = threading.Thread(target=dispatcher.notify, args=(alert(),), name="worker")
    worker.start()
    worker.join()
    assert calls == []  # queued, not run on the worker thread
    dispatcher.run_pending(11)
    assert calls == [("attn-logit-high", threading.current_thread().name)]
    dispatcher.run_pending(12)
    assert len(calls) == 1 and len(dispatcher.seen) == 1


def test_a_failing_callback_does_not_stop_the_others():
    dispatcher, calls = AlertDispatcher(), []
    dispatcher.add(lambda a: 1 / 0)
    dispatcher.add(lambda a: calls.append(a["id"]))
    dispatcher.notify(alert())
    dispatcher.run_pending(1)
    assert calls == [1]


def test_lower_lr_lasts_through_a_closed_form_scheduler_and_respects_cooldown():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-2)
    sched = WarmupCosine(opt, warmup_steps=0, total_steps=100, min_ratio=1.0)  # flat at 1e-2
    action = LowerLR(opt, 0.5, scheduler=sched, cooldown_steps=50)
    action(alert(severity="info"), step=5)  # below its severity: ignored
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2)
    action(alert(), step=5)
    action(alert(ident=2), step=20)  # a second alert of the same outbreak: within cooldown
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)  # the scheduler kept it
    action(alert(ident=3), step=60)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-3) and action.count == 2


def test_checkpoint_and_stop_act_on_critical_alerts_only():
    saved = []
    save, stop = Checkpoint(saved.append), StopTraining()
    for a in (alert("warning"), alert("critical", ident=2)):
        save(a, step=1)
        stop(a, step=1)
    assert [a["id"] for a in saved] == [2] and stop.requested


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"factor": 1.5}, "factor"),
        ({"factor": 0}, "factor"),
        ({"severity": "loud"}, "severity"),
        ({"cooldown_steps": -1}, "cooldown_steps"),
    ],
)
def test_bad_action_settings_name_the_field(kwargs, field):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=field):
        LowerLR(opt, **kwargs)


def test_install_actions_by_name():
    monitor = type("M", (), {"on_alert": lambda self, cb: got.append(cb)})()
    got: list = []
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    made = install_actions(monitor, ["stop", "lower-lr"], optimizer=opt)
    assert [type(a) for a in made] == [StopTraining, LowerLR] and got == made
    with pytest.raises(ValueError, match="unknown action 'pause'"):
        install_actions(monitor, ["pause"])
    with pytest.raises(ValueError, match="checkpoint needs a save function"):
        install_actions(monitor, ["checkpoint"])


def test_local_guard_raises_one_critical_alert_for_a_nonfinite_value():
    guard = LocalGuard()
    guard.log(3, {series_key("loss"): 2.5, series_key("grad.norm"): 1.0})
    assert guard.firing_alerts() == []
    guard.log(4, {series_key("loss"): 2.5, series_key("grad.norm", layer=1): float("inf")})
    guard.log(5, {series_key("loss"): float("nan")})  # the same outbreak: no second alert
    (a,) = guard.firing_alerts()
    assert (a["rule"], a["severity"], a["first_step"], a["metric"]) == (
        "local-nonfinite", "critical", 4, "grad.norm",
    )  # fmt: skip


def test_monitor_guard_stops_and_checkpoints_a_run_that_goes_nan_without_a_service():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    saved: list[dict] = []
    with Monitor(model, opt, run="nan", sink=MemorySink(), every=1) as monitor:
        monitor.on_alert(Checkpoint(saved.append))
        monitor.on_alert(StopTraining())
        stopped_at = None
        for step in range(40):
            if step == 5:  # a poisoned weight: every later loss is NaN
                with torch.no_grad():
                    model.lm_head.weight[0, 0] = float("nan")
            idx = torch.randint(0, 64, (2, 16))
            ce, z = loss_fn(model(idx), idx, z_loss=0.0)
            opt.zero_grad()
            (ce + z).backward()
            opt.step()
            monitor.step(step, loss=ce + z)
            if monitor.should_stop:
                stopped_at = step
                break
            monitor.flush(5)  # the report reaches the guard before the next step boundary
    # The report of step 5 reaches the guard on the worker thread: by step 5's own boundary or,
    # at the latest (flushed), by step 6's.
    assert stopped_at in (5, 6)
    assert [a["rule"] for a in saved] == ["local-nonfinite"] and saved[0]["first_step"] == 5
    assert [a["rule"] for a in monitor.firing_alerts()] == ["local-nonfinite"]
