"""FileSink writes JSON lines; ``logitwatch sync`` uploads them (and spools) exactly once."""

from __future__ import annotations

import json
import math

import pytest
from test_sender_helpers import Receiver

from logitwatch.agent.transport.filesink import FileSink
from logitwatch.agent.transport.sender import HttpSink, SenderConfig
from logitwatch.agent.transport.sink import series_key
from logitwatch.cli import main


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def _write_run(directory, run="offline", steps=5):
    sink = FileSink(directory, run, interval=0.05)
    sink.register_run(run, config={"lr": 3e-4}, tags={"team": "a"})
    for step in range(steps):
        sink.log(step, {series_key("loss"): 1.0 / (step + 1), series_key("act.rms", layer=0): 2.0})
    sink.log(steps, {series_key("loss"): math.nan})
    sink.close(5)
    return sink


def test_writes_json_lines_that_keep_nan(tmp_path):
    sink = _write_run(tmp_path)
    lines = [json.loads(line) for line in sink.path.read_text().splitlines()]
    assert lines[0]["run"] == "offline" and lines[0]["client"] == sink.client
    assert lines[1] == {"run": "offline", "config": {"lr": 3e-4}, "tags": {"team": "a"}}
    batches = [x for x in lines if "series" in x]
    loss = [v for b in batches for s in b["series"] if s["metric"] == "loss" for v in s["values"]]
    assert loss[:2] == [1.0, 0.5] and loss[-1] == "NaN"
    assert [b["seq"] for b in batches] == sorted({b["seq"] for b in batches})


def test_sync_uploads_a_file_sink_once(tmp_path, receiver, capsys):
    _write_run(tmp_path)
    assert main(["sync", str(tmp_path), "--server", receiver.url]) == 0
    assert receiver.runs["offline"] == {"config": {"lr": 3e-4}, "tags": {"team": "a"}}
    pts = receiver.points("offline")
    assert len(pts) == 11
    assert math.isnan(next(v for m, _, s, v, _ in pts if m == "loss" and s == 5))
    assert main(["sync", str(tmp_path / "offline.jsonl"), "--server", receiver.url]) == 0
    assert len(receiver.points("offline")) == 11 and receiver.duplicates >= 1
    assert "11 points sent" in capsys.readouterr().out


def test_sync_skips_a_damaged_last_line(tmp_path, receiver):
    sink = _write_run(tmp_path)
    with open(sink.path, "ab") as f:
        f.write(b'{"v": 1, "client": "x", "seq": 99, "series": [{"metr')
    assert main(["sync", str(tmp_path), "--server", receiver.url]) == 0
    assert len(receiver.points("offline")) == 11


def test_sync_uploads_a_spool_left_by_a_sink(tmp_path, receiver):
    port = receiver.port
    receiver.stop()
    cfg = SenderConfig(batch_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.1)
    sink = HttpSink(
        f"http://127.0.0.1:{port}", "spooled", spool_dir=tmp_path / "spool" / "spooled", config=cfg
    )
    sink.register_run("spooled", config={"d_model": 64})
    for step in range(8):
        sink.log(step, {series_key("loss"): float(step)})
    sink.close(2)
    receiver.port = port
    receiver.start()
    # the parent of the run directories, as a user would pass ./.logitwatch/spool
    assert main(["sync", str(tmp_path / "spool"), "--server", receiver.url]) == 0
    assert receiver.runs["spooled"]["config"] == {"d_model": 64}
    assert sorted(s for _, _, s, _, _ in receiver.points("spooled")) == list(range(8))
    assert main(["sync", str(tmp_path / "spool"), "--server", receiver.url]) == 0  # nothing left
    assert len(receiver.points("spooled")) == 8


def test_sync_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["sync", str(tmp_path / "missing"), "--server", "http://127.0.0.1:1"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["sync", str(tmp_path), "--server", "ftp://x"]) == 2
    assert "--server must be an http(s) URL" in capsys.readouterr().err


def test_sync_gives_up_when_the_service_stays_down(tmp_path, capsys):
    _write_run(tmp_path)
    rc = main(["sync", str(tmp_path), "--server", "http://127.0.0.1:9", "--timeout", "0.3"])
    assert rc == 1
    assert "service unreachable" in capsys.readouterr().err


def test_sync_stops_at_once_on_a_refused_token(tmp_path, receiver, capsys):
    _write_run(tmp_path)
    receiver.answers.extend([(401, {})] * 5)
    assert main(["sync", str(tmp_path), "--server", receiver.url, "--token", "bad"]) == 1
    assert "check --token" in capsys.readouterr().err
