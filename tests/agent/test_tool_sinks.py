"""W&B and TensorBoard sinks: a real Monitor on the reference decoder, read back with each tool's
own formats (an offline W&B run's ``.wandb`` log; TensorBoard's EventAccumulator)."""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
import pytest
import torch

from logitwatch.agent import Monitor, TensorBoardSink, WandbSink
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.forward import tag_of
from logitwatch.agent.transport.sink import MemorySink

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 6  # the last one reports a NaN loss: the local guard's critical alert


def _train(monitor: Monitor, *, user_log=None, steps: int = STEPS) -> None:
    torch.manual_seed(0)
    model, opt = monitor.model, monitor.optimizer
    for step in range(steps):
        idx = torch.randint(0, 64, (2, 17))
        ce, z = loss_fn(model(idx[:, :-1]), idx[:, 1:], 1e-4)
        (ce + z).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = (ce + z).detach() if step < steps - 1 else torch.tensor(math.nan)
        monitor.step(step, loss=loss, loss_z=z.detach(), tokens=idx.numel())
        if user_log is not None:
            user_log(step, float(ce.detach()))


def _monitor(**kw) -> Monitor:
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, max_seq_len=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Monitor(model, opt, run="tools", every=1, run_config={"lr": 1e-3}, **kw)


def _produced(record: MemorySink) -> dict[str, tuple[list[int], list[float]]]:
    keys = record.keys()  # a set of series keys (MemorySink is no dict)
    return {tag_of(k): record.series(k[0], **dict(k[1])) for k in keys}


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_tensorboard_event_files_hold_every_series_step_and_the_alert(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = MemorySink()
    tb = TensorBoardSink(tmp_path / "tb")
    monitor = _monitor(sink=record, also=[tb])
    _train(monitor)
    monitor.close()

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    produced = _produced(record)
    assert len(produced) > 30 and set(acc.Tags()["scalars"]) == set(produced)
    assert "logitwatch/attn.logit_max/layer1/head1" in produced
    for tag, (steps, values) in produced.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == steps, tag
        for e, v in zip(events, values, strict=True):  # TensorBoard scalars are float32
            assert _same(e.value, float(np.float32(v))), (tag, e.step)
    assert [e.step for e in acc.Scalars("logitwatch/loss")] == list(range(STEPS))
    assert math.isnan(acc.Scalars("logitwatch/loss")[-1].value)
    (alert,) = acc.Tensors("logitwatch/alerts")
    text = alert.tensor_proto.string_val[0].decode()
    assert alert.step == STEPS - 1 and "local-nonfinite" in text and "critical" in text
    assert "restart from a checkpoint" in text  # the cure travels with it
    (config,) = acc.Tensors("logitwatch/config")
    assert '"lr": 0.001' in config.tensor_proto.string_val[0].decode()
    assert tb.path is not None and tb.path.name.endswith(".logitwatch")


def test_wandb_offline_run_holds_every_series_step_and_the_alert(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from helpers.wandb_records import read_offline_run

    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                 "WANDB_CONSOLE": "off"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    run = wandb.init(project="logitwatch-test", dir=tmp_path, mode="offline")
    try:
        record = MemorySink()
        monitor = _monitor(sink=record, also=[WandbSink()])  # wandb.run by default
        # The user's own per-step logging, auto-stepped, in the same run (as the Trainer's
        # W&B callback does): neither theirs nor ours may be dropped by W&B's step rule.
        _train(monitor, user_log=lambda step, ce: run.log({"user/ce": ce, "user/step": step}))
        monitor.close()
    finally:
        run.finish()
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    got = read_offline_run(run_dir)

    produced = _produced(record)
    ours = {}
    for row in got.history:
        if "logitwatch/step" in row:
            for key, value in row.items():
                if key.startswith("logitwatch/") and key != "logitwatch/step":
                    ours.setdefault(key, ([], []))
                    ours[key][0].append(row["logitwatch/step"])
                    ours[key][1].append(value)
    assert set(ours) == set(produced) and len(produced) > 30
    for key, (steps, values) in produced.items():
        assert ours[key][0] == steps, key
        assert all(_same(a, b) for a, b in zip(ours[key][1], values, strict=True)), key  # float64
        assert _same(got.summary[key], values[-1]), key  # the summary holds the last value
    assert sorted(r["user/step"] for r in got.history if "user/step" in r) == list(range(STEPS))
    assert {"name": "", "glob": "logitwatch/*", "step": "logitwatch/step"} in got.metrics
    (alert,) = got.alerts
    assert alert["level"] == "ERROR" and alert["title"] == "logitwatch: local-nonfinite"
    assert "at step 5" in alert["text"] and "restart from a checkpoint" in alert["text"]
    assert got.config["logitwatch"]["config"] == {"lr": 1e-3}


def test_a_service_alert_reaches_tensorboard_once(tmp_path):
    from helpers.server import live_server
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from logitwatch.agent.transport.sender import HttpSink, SenderConfig

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - {name: loss-seen, metric: loss, severity: info, hint: just a test,\n"
        "     condition: {kind: threshold, op: '>', value: 0}}\n"
    )
    fast = SenderConfig(batch_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.2)
    with live_server(f"sqlite:///{tmp_path / 'lw.db'}", args=("--rules", str(rules))) as server:
        http = HttpSink(server.url, "tools", spool_dir=tmp_path / "spool", config=fast)
        monitor = _monitor(sink=http, also=[TensorBoardSink(tmp_path / "tb")])
        # Pace the steps so that the ingest answer carrying the alert comes back mid-run.
        _train(monitor, user_log=lambda step, ce: time.sleep(0.3), steps=STEPS + 4)
        monitor.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("logitwatch/alerts")]
    assert sum("loss-seen" in t for t in texts) == 1, texts  # firing in every answer, sent once
    assert any("just a test" in t and "**info**" in t for t in texts)


class _FakeRun:
    """Records where and what W&B would be asked: for the threading contract only."""

    def __init__(self, fail: bool = False, hang: threading.Event | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail, self.hang = fail, hang
        self.config = self

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define", threading.current_thread().name))

    def log(self, data):
        if self.hang is not None:
            self.hang.wait()
        self.calls.append(("log", threading.current_thread().name))
        if self.fail:
            raise RuntimeError("wandb service gone")

    def alert(self, title, text, level):
        self.calls.append(("alert", title))

    def update(self, d, allow_val_change=False):
        pass


def test_tool_calls_run_on_the_sinks_thread_and_failures_are_logged_once(caplog):
    run = _FakeRun(fail=True)
    sink = WandbSink(run, interval=0.05)
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"):
        t0 = time.perf_counter()
        for step in range(50):
            sink.log(step, {("loss", ()): 1.0, ("attn.logit_max", (("layer", "0"),)): 2.0})
        per_step = (time.perf_counter() - t0) / 50
        sink.alert({"rule": "r", "severity": "warning", "labels": {"layer": "0"}})
        assert sink.flush(10)
        sink.close(5)
    assert per_step < 1e-3  # a deque append, not a W&B call
    threads = {name for kind, name in run.calls if kind in ("log", "define")}
    assert threads == {"logitwatch-wandb"}
    assert sum(kind == "log" for kind, _ in run.calls) == 50
    assert ("alert", "logitwatch: r layer=0") in run.calls
    assert sum("wandb service gone" in r.getMessage() for r in caplog.records) == 1


def test_a_hanging_tool_never_holds_up_close():
    hang = threading.Event()
    sink = WandbSink(_FakeRun(hang=hang), interval=0.05)
    sink.log(0, {("loss", ()): 1.0})
    t0 = time.monotonic()
    sink.close(timeout=0.5)
    assert time.monotonic() - t0 < 1.0
    sink.log(1, {("loss", ()): 1.0})  # closed: ignored, never raises
    hang.set()


def test_wandb_sink_finds_a_run_started_after_it(monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")
    with pytest.raises(ValueError, match=r"wandb\.init"):
        WandbSink(object())
    monkeypatch.setattr(wandb, "run", None)
    sink = WandbSink(interval=0.05)  # as with transformers' report_to="wandb": no run yet
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"):
        sink.log(0, {("loss", ()): 1.0})
        sink.log(1, {("loss", ()): 1.0})
        assert sink.flush(5)
    assert sum("no W&B run" in r.getMessage() for r in caplog.records) == 1
    run = _FakeRun()
    monkeypatch.setattr(wandb, "run", run)  # the integration's wandb.init()
    sink.log(2, {("loss", ()): 1.0})
    sink.close(5)
    assert [kind for kind, _ in run.calls] == ["define", "define", "log"]


def test_tag_names_follow_the_tools_conventions():
    import doctest

    import logitwatch.agent.transport.forward as forward

    assert doctest.testmod(forward).failed == 0
    assert tag_of(("lr", (("group", "0"), ("rank", "1")))) == "logitwatch/lr/rank1/group0"
    assert tag_of(("act.rms", (("layer", "a/b"),))) == "logitwatch/act.rms/layer_a_b"
