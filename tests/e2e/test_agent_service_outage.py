"""Train, kill the service mid-run, keep training, start it again, finish: nothing lost, nothing twice.

A real ``logitwatch serve`` process on SQLite, the reference decoder training on the CPU, and
the agent's HttpSink; the agent's own record (a MemorySink fed the same steps) is compared
with what the service's REST reads return, series by series and value by value.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import torch
from helpers.answers import json_of
from helpers.reads import stored_points
from helpers.server import free_port, wait_ready

from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sender import HttpSink, SenderConfig
from logitwatch.agent.transport.sink import FanOutSink, MemorySink, series_key

RUN = "outage-e2e"


@contextlib.contextmanager
def _serve(db_url: str, port: int, log_path) -> Iterator[subprocess.Popen]:
    cmd = [sys.executable, "-m", "logitwatch", "serve", "--db", db_url]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        wait_ready(f"http://127.0.0.1:{port}", 60, proc, log=log_path)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()  # a crash, not a clean shutdown: a batch may be stored unanswered
        proc.wait(15)


def _train_step(model, opt, data, step) -> dict:
    idx = data[step % len(data)]
    logits = model(idx[:, :-1])
    ce, z = loss_fn(logits, idx[:, 1:], 1e-4)
    opt.zero_grad(set_to_none=True)
    (ce + z).backward()
    values = {series_key("loss"): ce.item(), series_key("loss.z"): z.item()}
    values[series_key("logits.max_abs")] = logits.detach().abs().max().item()
    for i, block in enumerate(model.blocks):
        grads = [p.grad.norm() for p in block.parameters() if p.grad is not None]
        values[series_key("grad.norm", layer=i)] = torch.stack(grads).norm().item()
        values[series_key("param.norm", layer=i)] = (
            torch.stack([p.norm() for p in block.parameters()]).norm().item()
        )
    values[series_key("lr", group=0)] = opt.param_groups[0]["lr"]
    opt.step()
    return values


def _stored(url: str) -> dict:
    return stored_points(url, RUN)


def test_points_survive_a_service_outage_exactly_once(tmp_path):
    torch.manual_seed(0)
    cfg = DecoderConfig(n_layers=2, d_model=32, n_heads=2, max_seq_len=32, z_loss=1e-4)
    model = Decoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, cfg.vocab_size, (8, 4, 17))
    db_url = f"sqlite:///{tmp_path / 'lw.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    record = MemorySink()
    sender_cfg = SenderConfig(batch_interval_s=0.1, backoff_initial_s=0.1, backoff_max_s=0.5)

    with _serve(db_url, port, log_path):
        http = HttpSink(url, RUN, spool_dir=tmp_path / "spool", config=sender_cfg)
        sink = FanOutSink([http, record])
        sink.register_run(RUN, config={"decoder": vars(cfg)}, tags={"test": "outage"})
        for step in range(25):
            sink.log(step, _train_step(model, opt, data, step))
            time.sleep(0.01)
        assert http.flush(30) and not http.offline
    # the service is gone: training goes on, the agent spools
    spooled = 0
    for step in range(25, 50):
        sink.log(step, _train_step(model, opt, data, step))
        time.sleep(0.01)
        spooled = max(spooled, http.spool.pending())
    assert http.flush(30) and http.offline
    assert max(spooled, http.spool.pending()) > 0
    with _serve(db_url, port, log_path):
        for step in range(50, 75):
            sink.log(step, _train_step(model, opt, data, step))
            time.sleep(0.01)
        assert http.flush(30)
        deadline = time.monotonic() + 30
        while (http.spool.pending() or http.offline) and time.monotonic() < deadline:
            time.sleep(0.05)
        sink.close(30)
        assert http.spool.pending() == 0, log_path.read_text()
        stored = _stored(url)
        run_info = json_of(httpx.get(f"{url}/api/v1/runs/{RUN}", timeout=10))

    keys = record.keys()
    produced = {key: record.series(key[0], **dict(key[1])) for key in keys}
    assert set(stored) == set(produced)
    for key, (steps, values) in produced.items():
        assert stored[key] == (steps, values), key  # every point once, bit for bit
    assert sum(len(s) for s, _ in stored.values()) == 75 * len(produced)
    assert run_info["last_step"] == 74 and run_info["max_segment"] == 0
