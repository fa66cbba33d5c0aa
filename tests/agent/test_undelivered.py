"""Undelivered points are never silent: close() waits for the service, then names what it
could not deliver (steps, spool, the exact ``logitwatch sync`` command), and that command works."""

from __future__ import annotations

import logging
import shlex
import threading
import time

import pytest
import torch
from test_sender_helpers import Receiver

from logitwatch.agent import Monitor, MonitorConfig
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sender import HttpSink, SenderConfig, Undelivered
from logitwatch.agent.transport.sink import series_key
from logitwatch.cli import main

FAST = SenderConfig(batch_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.2)


def _values(step: int) -> dict:
    return {series_key("loss"): 1.0 + step, series_key("act.rms", layer=0): 2.0 * step}


@pytest.fixture
def down():
    """A receiver that is not listening yet (start() brings it up on the same port)."""
    r = Receiver()
    r.stop()
    yield r
    r.release.set()
    r.stop()


def test_close_names_the_spooled_steps_and_the_command_delivers_them(down, tmp_path, caplog):
    sink = HttpSink(down.url, "r1", spool_dir=tmp_path / "spool", config=FAST)
    for step in range(12):
        sink.log(step, _values(step))
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"):
        t0 = time.monotonic()
        sink.close(timeout=1.0)
        took = time.monotonic() - t0
    assert 0.7 < took < 1.5  # it waited for the service, within the timeout
    u = sink.undelivered
    assert isinstance(u, Undelivered)
    assert (u.steps, u.first_step, u.last_step, u.points) == (12, 0, 11, 24)
    assert u.spool_dir == (tmp_path / "spool").resolve() and u.batches >= 1
    assert u.command == f"logitwatch sync {(tmp_path / 'spool').resolve()} --server {down.url}"
    (msg,) = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert "12 steps" in msg and "steps 0-11" in msg and u.command in msg.splitlines()[1]

    down.start()
    argv = shlex.split(u.command)
    assert argv[0] == "logitwatch" and main(argv[1:]) == 0  # the exact command
    assert sorted({s for _, _, s, _, _ in down.points("r1")}) == list(range(12))
    assert len(down.points("r1")) == 24


def test_close_waits_for_a_service_that_comes_back_in_time(down, tmp_path, caplog):
    sink = HttpSink(down.url, "r1", spool_dir=tmp_path / "spool", config=SenderConfig(
        batch_interval_s=0.05, backoff_initial_s=2.0, backoff_max_s=30.0))  # fmt: skip
    for step in range(5):
        sink.log(step, _values(step))
    assert sink.flush(5) and sink.offline  # on disk, in a long backoff
    threading.Timer(1.0, down.start).start()
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"):
        t0 = time.monotonic()
        sink.close(timeout=8.0)
        took = time.monotonic() - t0
    assert took < 4.0  # close cut the 2-30 s backoff short once it was waiting
    assert sink.undelivered is None
    assert not any("not delivered" in r.getMessage() for r in caplog.records)
    assert len(down.points("r1")) == 10


def test_nothing_to_say_when_everything_arrived(tmp_path):
    r = Receiver()
    try:
        sink = HttpSink(r.url, "r1", spool_dir=tmp_path, config=FAST)
        sink.log(0, _values(0))
        t0 = time.monotonic()
        sink.close(timeout=10)
        assert time.monotonic() - t0 < 2 and sink.undelivered is None
    finally:
        r.stop()


def test_monitor_close_timeout_setting_and_undelivered(down, tmp_path, caplog):
    with pytest.raises(ValueError, match="close_timeout_s"):
        MonitorConfig(close_timeout_s=-1)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2, max_seq_len=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = Monitor(model, opt, run="m1", server=down.url, spool_dir=tmp_path / "spool",
                      config=MonitorConfig(close_timeout_s=1.0))  # fmt: skip
    for step in range(3):
        idx = torch.randint(0, 64, (2, 17))
        loss = loss_fn(model(idx[:, :-1]), idx[:, 1:], 0.0)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(step, loss=loss.detach())
    assert monitor.undelivered is None  # nothing to say before close
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"):
        t0 = time.monotonic()
        monitor.close()  # the config's 1 s, not the default 10 s
        assert time.monotonic() - t0 < 2.5
    u = monitor.undelivered
    assert u is not None and u.steps == 3 and u.run == "m1"
    assert any(u.command in r.getMessage() for r in caplog.records)
