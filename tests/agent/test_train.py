"""The CPU trainer: it learns, writes metrics, resumes exactly, and rejects bad settings cleanly."""

import argparse
import doctest
import importlib
import json
import subprocess
import sys

import pytest
import torch

from logitwatch.agent.cli.train import add_arguments, config_from_args
from logitwatch.agent.reference.train import TrainConfig, train
from logitwatch.agent.reference.train_config import load_config_file
from logitwatch.schedules import lr_at

TINY = {"n_layers": 2, "d_model": 64, "n_heads": 4, "head_dim": 16, "n_kv_heads": 2, "d_ff": 160}


def _cfg(**kw):
    base = dict(steps=30, batch_size=8, seq_len=32, progress=False, corpus_bytes=100_000,
                eval_batches=2, model=dict(TINY), log_every=4)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_loss_decreases_and_metrics_file_has_every_step(tmp_path):
    out = tmp_path / "m.jsonl"
    result = train(_cfg(metrics_out=str(out), z_loss=1e-4))
    assert result.start_step == 0 and result.end_step == 30
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    assert first == pytest.approx(5.55, abs=0.3)  # ~ln(256): a uniform guess over bytes
    assert last < first - 1.0
    assert result.val_loss is not None and result.val_loss < first - 1.0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(30))
    schedule = _cfg().schedule_config()
    for line, loss in zip(lines, result.losses, strict=True):
        assert {"step", "loss", "loss_z", "lr", "tokens_per_s", "grad_norm"} <= line.keys()
        assert line["loss"] == loss
        assert line["lr"] == pytest.approx(lr_at(schedule, line["step"]))
        assert line["loss_z"] > 0 and line["tokens_per_s"] > 0


def test_checkpoint_and_resume_continue_at_the_step_with_identical_lr(tmp_path):
    kw = dict(
        steps=12, save_every=6, save_dir=str(tmp_path / "ck"), schedule="sgdr", t0=4, warmup=2
    )
    full = train(_cfg(**kw, metrics_out=str(tmp_path / "a.jsonl")))
    assert full.checkpoint == str(tmp_path / "ck" / "step_000012.pt")
    assert (tmp_path / "ck" / "step_000006.pt").is_file()

    # The resumed run appends to the first run's metrics file, dropping the steps it redoes.
    resumed = train(_cfg(**kw, resume=str(tmp_path / "ck" / "step_000006.pt"),
                         metrics_out=str(tmp_path / "a.jsonl")))  # fmt: skip
    assert resumed.start_step == 6 and resumed.end_step == 12
    assert resumed.lrs == full.lrs[6:]  # same schedule, restart at step 6 included
    assert resumed.losses == pytest.approx(full.losses[6:], rel=1e-4)  # same batches and weights
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(12))
    assert [line["loss"] for line in lines[6:]] == resumed.losses


def test_resume_from_directory_and_mismatch_is_named(tmp_path):
    ck = tmp_path / "ck"
    train(_cfg(steps=4, save_every=2, save_dir=str(ck), eval_batches=0))
    with pytest.raises(ValueError, match=r"steps \(4\) must exceed"):
        train(_cfg(steps=4, resume=str(ck)))  # the directory's latest is step 4
    with pytest.raises(ValueError, match="d_model"):
        train(_cfg(steps=6, resume=str(ck), model={**TINY, "d_model": 32, "head_dim": 8}))
    with pytest.raises(ValueError, match="resume: no checkpoint"):
        train(_cfg(resume=str(tmp_path / "missing.pt")))


def test_published_size_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"model: training needs about [\d,]+ GiB"):
        train(_cfg(preset="gpt3", full=True, model={}))


def test_monitor_gets_every_step_and_is_closed(tmp_path):
    calls = []

    class Recorder:  # a stand-in for logitwatch.agent.monitoring.monitor.Monitor in this unit test
        def __init__(self, model, optimizer, **kw):
            calls.append(("init", kw))
            self.optimizer = optimizer

        def step(self, step, **values):
            # The LR the monitor reads is the one this step used.
            calls.append(("step", step, sorted(values), self.optimizer.param_groups[0]["lr"]))

        def close(self, timeout=None):
            calls.append(("close", timeout))

    result = train(_cfg(steps=3, run="r1", every=2, eval_batches=0), monitor_factory=Recorder)
    init = calls[0][1]
    assert init["run"] == "r1" == result.run and init["every"] == 2 and init["start_step"] == 0
    assert init["run_config"]["schedule"]["kind"] == "cosine"
    assert init["run_config"]["decoder"]["d_model"] == 64
    keys = ["loss", "loss_z", "tokens"]
    assert calls[1:4] == [("step", s, keys, lr) for s, lr in enumerate(result.lrs)]
    assert calls[-1] == ("close", None)  # the monitor's own close_timeout_s

    # A spool alone turns monitoring on, under a made-up run name that a resume keeps.
    calls.clear()
    ck = tmp_path / "ck"
    first = train(_cfg(steps=2, spool=str(tmp_path / "sp"), save_every=2, save_dir=str(ck),
                       eval_batches=0), monitor_factory=Recorder)  # fmt: skip
    assert calls[0][1]["spool_dir"] == str(tmp_path / "sp") and first.run.startswith("llama2-")
    calls.clear()
    again = train(_cfg(steps=3, spool=str(tmp_path / "sp"), resume=str(ck), eval_batches=0),
                  monitor_factory=Recorder)  # fmt: skip
    assert again.run == first.run and calls[0][1]["start_step"] == 2

    # --param-every reaches the Monitor's config; without it the Monitor's default stands.
    calls.clear()
    train(_cfg(steps=2, run="r2", every=2, param_every=4, eval_batches=0), monitor_factory=Recorder)
    assert calls[0][1]["config"].param_every == 4 and calls[0][1]["config"].weights_every == 4


def test_no_monitor_without_server_run_or_spool():
    def refuse(*a, **k):
        raise AssertionError("monitor created")

    train(_cfg(steps=1, eval_batches=0), monitor_factory=refuse)


def test_callback_can_stop_and_sees_tensors():
    seen = []

    def cb(info):
        seen.append((info.step, info.lr, isinstance(info.loss, torch.Tensor)))
        return info.step == 2

    result = train(_cfg(steps=10, eval_batches=0), callbacks=[cb])
    assert result.end_step == 3 and [s for s, _, _ in seen] == [0, 1, 2]
    assert all(is_tensor for _, _, is_tensor in seen)


def test_technique_flags_reach_the_decoder(tmp_path):
    cfg = _parse(["--no-qk-norm", "--z-loss", "1e-4", "--softcap-attn", "50", "--softcap-final",
                  "30", "--ffn", "gelu", "--dropout", "0.1", "--bf16", "--steps", "5"])  # fmt: skip
    dec = cfg.decoder_config()
    assert (dec.qk_norm, dec.z_loss, dec.softcap_attn, dec.softcap_final, dec.ffn) == (
        False, 1e-4, 50.0, 30.0, "gelu")  # fmt: skip
    assert dec.dropout_attn == dec.dropout_resid == 0.1 and cfg.bf16 and cfg.steps == 5
    assert (
        _parse(["--softcap-attn", "50", "--softcap-attn", "off"]).decoder_config().softcap_attn
        is None
    )


def test_config_file_toml_and_json_with_flags_winning(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'preset = "palm"\nsteps = 40\nlr = 1e-3\n[model]\nn_layers = 2\nqk_norm = true\n'
    )
    cfg = _parse(["--config", str(toml), "--steps", "7"])
    assert (cfg.preset, cfg.steps, cfg.lr, cfg.config_file) == ("palm", 7, 1e-3, str(toml))
    dec = cfg.decoder_config()
    assert dec.n_layers == 2 and dec.qk_norm and dec.n_kv_heads == 1 and dec.z_loss == 1e-4
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"preset": None, "d_model": 96, "n_heads": 3, "ffn": "relu"}))
    dec = _parse(["--config", str(js)]).decoder_config()
    assert (dec.d_model, dec.n_heads, dec.ffn) == (96, 3, "relu")
    assert load_config_file(js)["d_model"] == 96


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("stepz = 3\n", "unknown config key 'stepz'"),
        ("[model]\nd_model = -4\n", "d_model must be an integer"),
        ("steps = [\n", "not valid TOML"),
        ('bf16 = "yes"\n', "bf16 must be true or false"),
    ],
)
def test_bad_config_file_named(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        _parse(["--config", str(path)])


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--lr", "fast"], "lr must be a number"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--dropout", "-0.1"], "dropout must be a number"),
        (["--softcap-attn", "-5"], "softcap_attn"),
        (["--schedule", "linear"], "schedule must be one of"),
        (["--preset", "gpt5"], "unknown preset 'gpt5'"),
        (["--warmup", "300", "--steps", "100"], r"schedule\.warmup_steps"),
        (["--device", "tpu"], "device must be"),
        (["--every", "4", "--param-every", "6"], r"param_every must be a multiple of every \(4\)"),
        (["--param-every", "0"], "param_every must be an integer >= 1"),
    ],
)
def test_bad_flags_named(argv, field):
    with pytest.raises(ValueError, match=field):
        _parse(argv)


def test_cli_end_to_end_summary_and_clean_error(tmp_path):
    cmd = [sys.executable, "-m", "logitwatch", "train"]
    ok = subprocess.run(
        [*cmd, "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--corpus-bytes", "20000",
         "--no-progress", "--metrics-out", str(tmp_path / "m.jsonl")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "first loss" in ok.stdout and "tokens/s" in ok.stdout
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 3
    bad = subprocess.run([*cmd, "--dropout", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "logitwatch: error: dropout must be a number in [0, 0.99]; got 2.0."
    ]


def test_doctests():
    # importlib: ``logitwatch.agent.reference.train`` as an attribute is the re-exported function.
    for name in ("logitwatch.agent.reference.train", "logitwatch.agent.reference.train_config"):
        assert doctest.testmod(importlib.import_module(name)).failed == 0


def test_real_monitor_reports_the_lr_each_step_used(tmp_path, monkeypatch):
    # No server: the Monitor writes its batches to .logitwatch/runs/<run>/ under the cwd.
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(steps=8, run="itest", every=2, warmup=3, eval_batches=0)
    result = train(cfg)
    lines = [
        json.loads(line) for line in next(tmp_path.rglob("itest.jsonl")).read_text().splitlines()
    ]
    config = next(line["config"] for line in lines if "config" in line)
    assert config["schedule"]["warmup_steps"] == 3 and config["decoder"]["d_model"] == 64
    seen = {}
    for line in lines:
        for s in line.get("series", []):
            if s["metric"] in ("lr", "loss") and s["labels"].get("group", "decay") == "decay":
                seen.update(
                    {(s["metric"], st): v for st, v in zip(s["steps"], s["values"], strict=True)}
                )
    schedule = cfg.schedule_config()
    lr_steps = sorted(st for metric, st in seen if metric == "lr")
    assert len(lr_steps) >= 3 and set(lr_steps) <= set(range(8))  # every 2nd step or so
    for st in lr_steps:
        assert seen[("lr", st)] == pytest.approx(lr_at(schedule, st))
        assert seen[("loss", st)] == pytest.approx(result.losses[st])
