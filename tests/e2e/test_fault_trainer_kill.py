"""SIGKILL the training process mid-run (service unreachable, so its points wait in the spool),
restart it from its last checkpoint with the same spool: the old spool is replayed, the resumed
steps form a new segment, and queries show the resumed run's values.

Real processes: ``logitwatch train`` (tiny llama2-style decoder on the CPU) and ``logitwatch
serve`` on SQLite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import helpers.server
from helpers.answers import json_of
from helpers.server import free_port

from logitwatch.agent.transport.spool import read_state

RUN = "trainer-kill"
TRAIN = ["--preset", "llama2", "--steps", "30", "--batch-size", "2", "--seq-len", "16",
         "--warmup", "4", "--every", "1", "--log-every", "1", "--corpus-bytes", "20000",
         "--save-every", "10", "--device", "cpu", "--no-progress", "--run", RUN]  # fmt: skip


def _train(tmp_path, url: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "logitwatch", "train", *TRAIN, "--server", url,
           "--spool", str(tmp_path / "spool"), "--save-dir", str(tmp_path / "ckpt"), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny ops: threads only contend
    log = open(tmp_path / "train.log", "ab")  # noqa: SIM115 - closed by the test
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)


def test_trainer_killed_and_resumed_from_checkpoint(tmp_path, monkeypatch):
    db_url = f"sqlite:///{tmp_path / 'lw.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Phase 1: the service is not there yet; the trainer spools, checkpoints, and is killed.
    first = _train(tmp_path, url, "--metrics-out", str(tmp_path / "m1.jsonl"))
    ckpt = tmp_path / "ckpt"
    deadline = time.monotonic() + 240
    while not (ckpt / "step_000020.pt").exists():
        assert first.poll() is None, (tmp_path / "train.log").read_text()
        assert time.monotonic() < deadline, "no checkpoint at step 20"
        time.sleep(0.05)
    # A little past the checkpoint, on disk: the spool must hold steps the resumed run will
    # redo. Its state file says how far it got (a sleep would guess, and the agent spools
    # once per batch interval, behind training).
    while (read_state(tmp_path / "spool").get("last_step") or 0) < 21 and first.poll() is None:
        assert time.monotonic() < deadline, "the spool never got past step 20"
        time.sleep(0.02)
    assert first.returncode in (None, 0), (tmp_path / "train.log").read_text()
    first.send_signal(signal.SIGKILL)  # a no-op if a fast machine already ran all 30 steps
    first.wait(10)
    spooled = list((tmp_path / "spool").glob("*.spool"))
    assert spooled and sum(p.stat().st_size for p in spooled) > 0

    # Phase 2: the service is up; resume from the checkpoint at step 10 with the same spool.
    monkeypatch.setattr(helpers.server, "free_port", lambda: port)  # the URL the trainer knows
    with helpers.server.live_server(db_url) as server:
        second = _train(tmp_path, server.url, "--resume", str(ckpt / "step_000010.pt"),
                        "--metrics-out", str(tmp_path / "m2.jsonl"))  # fmt: skip
        assert second.wait(240) == 0, (tmp_path / "train.log").read_text()
        with server.client() as c:
            info = json_of(c.get(f"/api/v1/runs/{RUN}"))
            newest = json_of(c.get(f"/api/v1/runs/{RUN}/metrics/loss", params={"limit": 10_000}))
            every = json_of(c.get(f"/api/v1/runs/{RUN}/metrics/loss",
                                  params={"limit": 10_000, "segments": "all"}))  # fmt: skip

    assert info["max_segment"] == 1 and info["last_step"] == 29
    resumed = {}
    for line in (tmp_path / "m2.jsonl").read_text().splitlines():
        row = json.loads(line)
        resumed[row["step"]] = row["loss"]
    assert min(resumed) == 10 and max(resumed) == 29
    (series,) = newest["series"]
    got = dict(zip(series["steps"], series["values"], strict=True))
    assert sorted(got) == list(range(30))  # steps 0-9 from the replayed spool, one per step
    for step, loss in resumed.items():  # the resumed values win where both segments have one
        assert abs(got[step] - loss) <= 1e-6 * abs(loss), step
    segments = {}
    for e in every["series"]:
        for step in e["steps"]:
            segments.setdefault(e.get("segment", 0), set()).add(step)
    assert segments[1] == set(range(10, 30))
    assert set(range(10)) <= segments[0] and max(segments[0]) >= 19  # old spool replayed
