"""HttpSink against a small real HTTP receiver: batching, retries, spool and replay, close."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_sender_helpers import Receiver

from logitwatch.agent.transport.sender import HttpSink, SenderConfig
from logitwatch.agent.transport.sink import series_key
from logitwatch.agent.transport.spool import Spool

FAST = SenderConfig(batch_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.2)


def _values(step: int, n: int = 200) -> dict:
    vals = {
        series_key("attn.logit_max", layer=i // 8, head=i % 8): step + i / 1000
        for i in range(n - 1)
    }
    vals[series_key("loss")] = 10.0 / (step + 1)
    return vals


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.release.set()
    r.stop()


def test_batches_every_point_once_in_order(receiver, tmp_path):
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
    for step in range(30):
        sink.log(step, _values(step))
    sink.log(30, {series_key("loss"): math.nan, series_key("grad.norm"): math.inf})
    assert sink.flush(10)
    sink.close(5)
    pts = receiver.points("r1")
    assert len(pts) == 30 * 200 + 2
    got = {(m, lab, s): v for m, lab, s, v, _ in pts}
    assert got[("loss", (), 3)] == 10.0 / 4
    assert got[("attn.logit_max", (("head", "1"), ("layer", "2")), 7)] == 7 + 17 / 1000
    assert math.isnan(got[("loss", (), 30)]) and got[("grad.norm", (), 30)] == math.inf
    # batched: far fewer requests than steps, one client, seq increasing
    clients = {c for c, _ in receiver.order}
    seqs = [s for _, s in receiver.order]
    assert len(clients) == 1 and seqs == sorted(seqs) and len(seqs) < 31


def test_bad_input_is_logged_once_and_never_raises(receiver, tmp_path, caplog):
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"):
        for step in range(3):
            sink.log(step, {series_key("loss"): "not a number", series_key("Bad-Name"): 1.0})
            sink.log(step, {series_key("loss"): 1.0 + step})
        sink.log(-5, {series_key("loss"): 1.0})
        sink.log(7, None)  # not a mapping at all
        sink.close(5)
    assert sorted(s for _, _, s, _, _ in receiver.points()) == [0, 1, 2]
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("not a number" in m for m in msgs) == 1
    assert sum("Bad-Name" in m for m in msgs) == 1
    assert any("step -5" in m for m in msgs)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(receiver, tmp_path, status):
    receiver.answers.append((status, {"Retry-After": "1"}))
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
    sink.log(0, {series_key("loss"): 1.0})
    assert _wait(lambda: len(receiver.points()) == 1)
    sink.close(5)
    posts = [t for m, p, t in receiver.requests if m == "POST"]
    # backoff alone would retry after ~0.05 s; the service asked for 1 s
    assert len(posts) == 2 and posts[1] - posts[0] >= 0.95


def test_server_errors_retry_with_backoff(receiver, tmp_path):
    receiver.answers.extend([(500, {}), (502, {}), (500, {})])
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
    sink.log(0, {series_key("loss"): 1.0})
    assert _wait(lambda: len(receiver.points()) == 1)
    sink.close(5)
    assert len([m for m, _, _ in receiver.requests if m == "POST"]) == 4


def test_spools_while_down_and_replays_in_order(receiver, tmp_path):
    port = receiver.port
    receiver.stop()
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
    for step in range(20):
        sink.log(step, _values(step, 50))
        time.sleep(0.01)
    assert sink.flush(5)  # stored on disk counts as delivered
    assert sink.offline and sink.spool.pending() > 1
    assert list(tmp_path.glob("*.spool"))
    receiver.port = port
    receiver.start()
    for step in range(20, 25):
        sink.log(step, _values(step, 50))
    assert _wait(lambda: len(receiver.points()) == 25 * 50)
    sink.close(5)
    seqs = [s for _, s in receiver.order]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert not sink.offline and receiver.duplicates <= 1


def test_new_sink_replays_the_spool_of_a_crashed_process(receiver, tmp_path):
    port = receiver.port
    receiver.stop()
    # A training process that cannot reach the service and then dies without closing.
    code = textwrap.dedent(f"""
        import os, time
        from logitwatch.agent.transport.sender import HttpSink, SenderConfig
        from logitwatch.agent.transport.sink import series_key
        sink = HttpSink("http://127.0.0.1:{port}", "r1", spool_dir={str(tmp_path)!r},
                        config=SenderConfig(batch_interval_s=0.05, backoff_initial_s=0.05))
        for step in range(10):
            sink.log(step, {{series_key("loss"): float(step)}})
        assert sink.flush(10)
        os._exit(1)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    receiver.port = port
    receiver.start()
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
    sink.log(10, {series_key("loss"): 10.0})
    assert _wait(lambda: len(receiver.points()) == 11)
    sink.close(5)
    clients = []
    for c, _ in receiver.order:
        if c not in clients:
            clients.append(c)
    assert len(clients) == 2 and clients[1] == sink.client  # the old spool went first
    assert sorted(s for _, _, s, _, _ in receiver.points()) == list(range(11))
    assert not list(Path(tmp_path).glob("*.spool")) or Spool(tmp_path).pending() == 0


def test_full_disk_keeps_batches_in_memory(receiver, tmp_path, monkeypatch, caplog):
    import errno

    import logitwatch.agent.transport.spool as spool_mod

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    port = receiver.port
    receiver.stop()
    # A fake filesystem, only in this unit test: every spool write fails with ENOSPC.
    monkeypatch.setattr(spool_mod, "_write_all", no_space)
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"):
        sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
        for step in range(10):
            sink.log(step, {series_key("loss"): float(step)})
            time.sleep(0.02)
        assert not sink.flush(0.5)  # neither delivered nor stored
        receiver.port = port
        receiver.start()
        assert _wait(lambda: len(receiver.points()) == 10)
        sink.close(5)
    assert sum("No space left" in r.getMessage() for r in caplog.records) == 1


def test_close_returns_in_time_with_a_hanging_server(receiver, tmp_path):
    receiver.hang.set()
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
    sink.log(0, {series_key("loss"): 1.0})
    assert _wait(lambda: receiver.requests)
    t0 = time.monotonic()
    sink.close(timeout=1.0)
    assert time.monotonic() - t0 < 1.5
    receiver.hang.clear()
    receiver.release.set()
    # What was in flight is on disk; the next sink delivers it.
    sink2 = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
    assert _wait(lambda: len(receiver.points()) == 1)
    sink2.close(5)


def test_registers_run_and_creates_it_when_missing(tmp_path):
    receiver = Receiver(require_run=True)
    try:
        sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path / "a", config=FAST)
        sink.register_run("r1", config={"d_model": 256, "path": Path("/x")}, tags={"k": 1})
        sink.log(0, {series_key("loss"): 1.0})
        sink.close(5)
        assert receiver.runs["r1"] == {"config": {"d_model": 256, "path": "/x"}, "tags": {"k": "1"}}
        sink = HttpSink(receiver.url, "r2", spool_dir=tmp_path / "b", config=FAST)
        sink.log(0, {series_key("loss"): 1.0})  # never registered: the sink creates it on 404
        sink.close(5)
        assert "r2" in receiver.runs and len(receiver.points("r2")) == 1
    finally:
        receiver.stop()


def test_firing_alerts_come_from_the_ingest_answer(receiver, tmp_path):
    receiver.alerts = [{"rule": "attn_logit_growth", "severity": "critical"}]
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
    assert sink.firing_alerts() == []
    sink.log(0, {series_key("loss"): 1.0})
    assert sink.flush(5)
    assert sink.firing_alerts() == receiver.alerts
    sink.close(5)


def test_resume_opens_a_new_segment_only_when_steps_overlap(receiver, tmp_path):
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path / "1", config=FAST)
    for step in range(10):
        sink.log(step, {series_key("loss"): 1.0})
    sink.close(5)
    # resumed from a checkpoint at step 5: steps 5..9 exist, so segment 1
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path / "2", resume_from_step=5, config=FAST)
    sink.log(5, {series_key("loss"): 2.0})
    sink.close(5)
    # a resume past the last step keeps the current segment
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path / "3", resume_from_step=50, config=FAST)
    sink.log(50, {series_key("loss"): 3.0})
    sink.close(5)
    seg = {(s, v): g for _, _, s, v, g in receiver.points()}
    assert seg[(0, 1.0)] == 0 and seg[(5, 1.0)] == 0
    assert seg[(5, 2.0)] == 1 and seg[(50, 3.0)] == 1


def test_resume_while_offline_uses_the_local_state(receiver, tmp_path):
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=FAST)
    for step in range(10):
        sink.log(step, {series_key("loss"): 1.0})
    sink.close(5)
    port = receiver.port
    receiver.stop()
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, resume_from_step=3, config=FAST)
    sink.log(3, {series_key("loss"): 2.0})
    assert sink.flush(5)
    receiver.port = port
    receiver.start()
    assert _wait(lambda: len(receiver.points()) == 11)
    sink.close(5)
    assert {g for _, _, s, v, g in receiver.points() if v == 2.0} == {1}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_interval_s", 0),
        ("max_points_per_batch", 0),
        ("compression", "zstd"),
        ("backoff_max_s", 0.01),
    ],
)
def test_sender_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"sender.{field}"):
        SenderConfig(**{field: value})


def test_a_script_that_forgets_close_still_delivers(receiver, tmp_path):
    code = textwrap.dedent(f"""
        from logitwatch.agent.transport.sender import HttpSink
        from logitwatch.agent.transport.sink import series_key
        sink = HttpSink({receiver.url!r}, "r1", spool_dir={str(tmp_path)!r})
        for step in range(5):
            sink.log(step, {{series_key("loss"): float(step)}})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(s for _, _, s, _, _ in receiver.points()) == list(range(5))


def test_gzip_falls_back_to_plain_bodies_when_refused(receiver, tmp_path):
    cfg = SenderConfig(batch_interval_s=0.05, compression="gzip")
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=cfg)
    sink.log(0, {series_key("loss"): 1.0})  # the test receiver does not decode gzip: 400
    assert _wait(lambda: len(receiver.points()) == 1)
    sink.close(5)


def test_a_full_outbox_spills_to_disk_instead_of_dropping(receiver, tmp_path):
    cfg = SenderConfig(batch_interval_s=0.02, backoff_initial_s=0.05, max_memory_mb=0.01)
    sink = HttpSink(receiver.url, "r1", spool_dir=tmp_path, config=cfg)
    assert _wait(lambda: receiver.requests)  # the start-up GET is answered
    receiver.hang.set()  # then the service accepts and never answers: the poster is stuck
    for step in range(60):
        sink.log(step, {series_key("act.rms", layer=i): float(step) for i in range(20)})
        time.sleep(0.005)
    assert _wait(lambda: sink.spool.pending() > 3)
    assert sink.dropped_points == 0
    receiver.hang.clear()
    receiver.release.set()
    assert _wait(lambda: len(receiver.points()) == 60 * 20)
    sink.close(5)
    assert sink.dropped_points == 0


def test_sinks_are_exported_and_are_sinks():
    import logitwatch.agent as agent
    from logitwatch.agent.transport.sink import Sink

    assert {"FileSink", "HttpSink", "SenderConfig"} <= set(agent.__all__)
    assert issubclass(agent.HttpSink, Sink) and issubclass(agent.FileSink, Sink)
