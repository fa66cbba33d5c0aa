"""SIGKILL the service in the middle of a streaming training run, restart it: every point the
agent produced is stored exactly once, on SQLite and on PostgreSQL.

Real processes: ``logitwatch serve`` killed with SIGKILL while batches are in flight, the
reference decoder training on the CPU with the real Monitor, the agent's HttpSink. The agent's
own record is a MemorySink fed the same reports (a FanOutSink), compared value by value.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers.answers import json_of
from helpers.pg import database_url
from helpers.reads import stored_points
from helpers.server import free_port, serve_process

from logitwatch.agent import Monitor
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sender import HttpSink, SenderConfig
from logitwatch.agent.transport.sink import FanOutSink, MemorySink

RUN = "kill-e2e"


def _stored(url: str) -> dict:
    return stored_points(url, RUN)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_sigkill_mid_stream_loses_nothing_and_stores_nothing_twice(tmp_path, kind):
    # One intra-op thread: on a shared, loaded machine more threads make tiny ops ~50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _kill_and_compare(tmp_path, kind)
    finally:
        torch.set_num_threads(threads)


def _kill_and_compare(tmp_path, kind: str) -> None:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, max_seq_len=16)
    model = Decoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 64, (8, 2, 17))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    record = MemorySink()
    sender = SenderConfig(batch_interval_s=0.02, backoff_initial_s=0.05, backoff_max_s=0.3)
    with (
        database_url(kind, tmp_path, "lwfault") as db_url,
        open(tmp_path / "serve.log", "ab") as log,
    ):
        proc = serve_process(db_url, port, log)
        http = HttpSink(url, RUN, spool_dir=tmp_path / "spool", config=sender)
        monitor = Monitor(model, opt, run=RUN, sink=FanOutSink([http, record]), every=2)
        killed = restarted = False
        try:
            for step in range(60):
                idx = data[step % len(data)]
                ce, z = loss_fn(model(idx[:, :-1]), idx[:, 1:], 1e-4)
                (ce + z).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                monitor.step(step, loss=ce + z, tokens=idx.numel())
                if step == 20:  # batches are streaming every 20 ms: kill mid-flight
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                    killed = True
                if step == 40:
                    assert http.offline or http.spool.pending() > 0
                    proc = serve_process(db_url, port, log)
                    restarted = True
            monitor.flush(30)
            deadline = time.monotonic() + 30
            while (http.spool.pending() or http.offline) and time.monotonic() < deadline:
                time.sleep(0.05)
            monitor.close(30)
            assert killed and restarted and http.spool.pending() == 0
            stored = _stored(url)
            info = json_of(httpx.get(f"{url}/api/v1/runs/{RUN}", timeout=10))
        finally:
            proc.kill()
            proc.wait(10)

    keys = record.keys()
    produced = {key: record.series(key[0], **dict(key[1])) for key in keys}
    assert len(produced) > 10 and set(stored) == set(produced)
    for key, (steps, values) in produced.items():
        assert stored[key] == (steps, values), key  # every point once, bit for bit
    n = sum(len(s) for s, _ in produced.values())
    assert sum(len(s) for s, _ in stored.values()) == n
    last = max(steps[-1] for steps, _ in produced.values())
    assert last >= 58 and info["last_step"] == last and info["max_segment"] == 0


TRAIN = ["--preset", "llama2", "--steps", "120", "--batch-size", "2", "--seq-len", "16",
         "--warmup", "4", "--every", "1", "--log-every", "1", "--corpus-bytes", "20000",
         "--device", "cpu", "--no-progress", "--run", "killed"]  # fmt: skip


def test_service_down_past_the_end_names_the_spool_and_its_command_delivers_it(tmp_path):
    """The user's report: the service SIGKILLed a third of the way into ``logitwatch train
    --every 1`` and still down when training ends. The run's last lines name the undelivered
    steps, the spool and the exact ``logitwatch sync`` command; that command, run against the
    restarted service, delivers every point."""
    db_url = f"sqlite:///{tmp_path / 'lw.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "logitwatch", "train", *TRAIN, "--server", url,
           "--metrics-out", str(tmp_path / "m.jsonl")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (
        open(tmp_path / "serve.log", "ab") as log,
        open(tmp_path / "train.out", "wb") as out,
        open(tmp_path / "train.err", "wb") as err,
    ):
        proc = serve_process(db_url, port, log)
        trainer = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 240
            while _loss_steps(url) < 20:  # a third of the way (the sender posts once a second)
                assert trainer.poll() is None, (tmp_path / "train.err").read_text()
                assert time.monotonic() < deadline, "no points reached the service"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            assert trainer.wait(300) == 0, (tmp_path / "train.err").read_text()
        finally:
            trainer.kill()
        stdout = (tmp_path / "train.out").read_text()
        stderr = (tmp_path / "train.err").read_text()
        spool = (tmp_path / ".logitwatch" / "spool" / "killed").resolve()
        command = f"logitwatch sync {spool} --server {url}"
        # The summary's last lines, and the warning the monitor logged at close, say the same.
        for text in (stdout, stderr):
            assert command in [line.strip() for line in text.splitlines()[-4:]], text[-2000:]
        (told,) = {int(n) for n in re.findall(r"(\d+) steps of run 'killed'", stdout + stderr)}
        assert "undelivered" in stdout and f"{told} steps spooled" in stdout

        proc = serve_process(db_url, port, log)  # back, but nothing delivers on its own
        try:
            before = _loss_steps(url)
            assert told > 0 and before + told >= 120  # a batch in flight at the kill: both
            bin_dir = str(Path(sys.executable).parent)
            synced = subprocess.run(command, shell=True, capture_output=True, text=True,
                                    env={**env, "PATH": f"{bin_dir}:{env.get('PATH', '')}"},
                                    cwd=tmp_path, timeout=120)  # fmt: skip
            assert synced.returncode == 0, synced.stderr
            stored = _stored_run(url, "killed")
        finally:
            proc.kill()
            proc.wait(10)

    losses = [json.loads(line)["loss"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    steps, values = stored[("loss", ())]
    assert steps == list(range(120)) and values == losses  # every step once, bit for bit
    n_series = len(stored)
    assert n_series > 20
    produced = 0
    for key, (got, _) in stored.items():  # every series at its steps
        want = list(range(120))
        if key[0] == "throughput.tokens_per_s":  # from step 1
            want = list(range(1, 120))
        elif key[0] in ("param.norm", "update.ratio"):  # the weights, every 10th step
            want = list(range(0, 120, 10))
        assert got == want, key
        produced += len(want)
    assert sum(len(s) for s, _ in stored.values()) == produced  # stored = produced


def _loss_steps(url: str) -> int:
    try:
        r = httpx.get(f"{url}/api/v1/runs/killed/metrics/loss", params={"limit": 10_000}, timeout=5)
    except httpx.HTTPError:
        return 0
    if r.status_code != 200:
        return 0
    return sum(len(s["steps"]) for s in r.json()["series"])


def _stored_run(url: str, run: str) -> dict:
    return stored_points(url, run)
