"""`logitwatch train --on-alert`: the trainer stops and checkpoints on the local guard's alert."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from logitwatch.agent.reference.train import TrainConfig, train

TINY = dict(preset=None, model=dict(n_layers=1, d_model=32, n_heads=2), batch_size=2, seq_len=16,
            corpus_bytes=20_000, eval_batches=0, progress=False, device="cpu")  # fmt: skip


def test_a_nan_run_is_checkpointed_and_stopped_at_a_step_boundary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Monitor's file sink writes under .logitwatch/

    def poison(info):
        if info.step == 3:  # from step 4 on every loss is NaN
            with torch.no_grad():
                info.model.lm_head.weight.fill_(float("nan"))

    cfg = TrainConfig(**TINY, steps=60, every=1, run="nan-run", on_alert=("checkpoint", "stop"),
                      save_dir=str(tmp_path / "ckpt"))  # fmt: skip
    result = train(cfg, callbacks=[poison])
    assert 5 <= result.end_step < 60  # stopped, at a boundary after the first NaN was reported
    saved = sorted((tmp_path / "ckpt").glob("step_*.pt"))
    assert [p.name for p in saved] == [f"step_{result.end_step:06d}.pt"]


def test_on_alert_settings_are_checked():
    with pytest.raises(ValueError, match="on_alert needs monitoring"):
        TrainConfig(**TINY, on_alert=("stop",))
    with pytest.raises(ValueError, match="unknown action 'pause'"):
        TrainConfig(**TINY, run="r", on_alert=("pause",))
    cfg = TrainConfig(**TINY, run="r", on_alert="stop")
    assert cfg.on_alert == ("stop",)


def test_cli_names_a_bad_action_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "logitwatch", "train", "--run", "r", "--on-alert", "stop,pause"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("logitwatch: error: on_alert: unknown")
    assert "Traceback" not in out.stderr
