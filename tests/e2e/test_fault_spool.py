"""The agent's spool under faults, against a real ``logitwatch serve``: a full disk (an ENOSPC
injected at the spool's one write function: no root mounts here), a spool file cut short in the
middle of a record, and the wall clock jumping back and forth. Training never sees an error,
each trouble is logged once, and every intact point arrives exactly once."""

from __future__ import annotations

import errno
import logging
import time

import helpers.server
import httpx
import pytest
from helpers.answers import json_of

import logitwatch.agent.transport.spool as spool_mod
from logitwatch.agent.transport.sender import HttpSink, SenderConfig
from logitwatch.agent.transport.sink import FanOutSink, MemorySink, series_key

FAST = SenderConfig(batch_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.2)
KEYS = [series_key("loss"), series_key("grad.norm", layer=0), series_key("grad.norm", layer=1)]


def _log(sink, step: int, **kw) -> None:
    sink.log(step, {k: step + i / 8 for i, k in enumerate(KEYS)}, **kw)


def _wait(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _stored(url: str, run: str) -> dict:
    out = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        for metric in ("loss", "grad.norm"):
            r = c.get(f"/api/v1/runs/{run}/metrics/{metric}", params={"limit": 10_000})
            body = json_of(r, (200, 404))  # 404: the run has stored nothing yet
            for e in body.get("series", []):
                out[series_key(metric, **e["labels"])] = (e["steps"], e["values"], e["times"])
    return out


def _produced(record: MemorySink) -> dict:
    keys = record.keys()
    return {k: record.series(k[0], **dict(k[1])) for k in keys}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One service for the tests that need it up from the start (a start costs seconds)."""
    with helpers.server.live_server(f"sqlite:///{tmp_path_factory.mktemp('s') / 'lw.db'}") as s:
        yield s


def _server_on(monkeypatch, port: int, db_url: str):
    monkeypatch.setattr(helpers.server, "free_port", lambda: port)
    return helpers.server.live_server(db_url)


def test_full_disk_then_service_back_nothing_lost(tmp_path, monkeypatch, caplog):
    port = helpers.server.free_port()
    url = f"http://127.0.0.1:{port}"
    real_write = spool_mod._write_all
    full = True

    def write(fd, data):  # the disk is full until `full` goes False
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(spool_mod, "_write_all", write)
    record = MemorySink()
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"):
        http = HttpSink(url, "full-disk", spool_dir=tmp_path / "spool", config=FAST)
        sink = FanOutSink([http, record])
        for step in range(40):  # service away and disk full: training goes on
            _log(sink, step)
            time.sleep(0.01)
        assert _wait(lambda: http.offline)
        full = False  # room on the disk again: the next batches spill what memory held
        for step in range(40, 60):
            _log(sink, step)
            time.sleep(0.01)
        assert _wait(lambda: http.spool.pending() > 0)
        with _server_on(monkeypatch, port, f"sqlite:///{tmp_path / 'lw.db'}") as server:
            assert http.flush(30)
            assert _wait(lambda: http.spool.pending() == 0 and not http.offline)
            sink.close(30)
            stored = _stored(server.url, "full-disk")
    assert sum("No space left" in r.getMessage() for r in caplog.records) == 1  # said once
    for key, (steps, values) in _produced(record).items():
        assert stored[key][:2] == (steps, values), key
        assert len(steps) == 60


def test_truncated_spool_replays_every_intact_record(tmp_path, server, caplog):
    url = f"http://127.0.0.1:{helpers.server.free_port()}"  # nobody listens there
    record = MemorySink()
    # A first process spools while the service is away, then dies.
    http = HttpSink(url, "cut", spool_dir=tmp_path / "spool", config=FAST)
    sink = FanOutSink([http, record])
    for step in range(30):
        _log(sink, step)
        time.sleep(0.01)
    sink.close(10)
    (last,) = sorted((tmp_path / "spool").glob("*.spool"))[-1:]
    size = last.stat().st_size
    with open(last, "r+b") as f:  # the crash cut the last record short
        f.truncate(size - 7)
    with caplog.at_level(logging.WARNING, logger="logitwatch.agent"):
        # The next process, same spool, the service now up: it replays what is intact.
        again = HttpSink(server.url, "cut", spool_dir=tmp_path / "spool", config=FAST)
        assert _wait(lambda: again.spool.pending() == 0)
        again.close(30)
        stored = _stored(server.url, "cut")
    assert sum("skip" in r.getMessage().lower() for r in caplog.records) == 1  # said once
    lost = 0
    for key, (steps, values) in _produced(record).items():
        got_steps, got_values, _ = stored[key]
        n = len(got_steps)
        assert (got_steps, got_values) == (steps[:n], values[:n]), key  # an intact prefix
        lost += len(steps) - n
    assert 0 < lost <= 3 * 30  # only the cut record's points are missing


def test_clock_jumps_do_not_disturb_delivery(tmp_path, server, monkeypatch):
    real_time = time.time
    offset = 0.0
    monkeypatch.setattr(time, "time", lambda: real_time() + offset)
    record = MemorySink()
    http = HttpSink(server.url, "clock", spool_dir=tmp_path / "spool", config=FAST)
    sink = FanOutSink([http, record])
    for step in range(45):
        if step == 15:
            offset = -3600.0  # NTP steps the clock back an hour
        if step == 30:
            offset = 86_400.0  # and then a day forward
        _log(sink, step)
        time.sleep(0.01)
    assert http.flush(30)
    sink.close(30)
    stored = _stored(server.url, "clock")
    for key, (steps, values) in _produced(record).items():
        got_steps, got_values, times = stored[key]
        assert (got_steps, got_values) == (steps, values)
        assert times[20] < times[10] < times[40]  # the times as the clock said, kept
