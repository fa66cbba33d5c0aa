"""The trainer's fp16 autocast (no loss scaler) and AdamW epsilon knobs, from flags to the step."""

import argparse

import pytest
import torch

from logitwatch.agent.cli.train import add_arguments, config_from_args
from logitwatch.agent.reference.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(preset=None, model={"n_layers": 1, "d_model": 32, "n_heads": 2}, steps=3,
            batch_size=2, seq_len=16, corpus_bytes=20_000, eval_batches=0, progress=False,
            device="cpu")  # fmt: skip


def parse(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


def test_fp16_runs_the_forward_in_half_precision_and_eps_reaches_adamw():
    seen = {}

    def record(module, args, out):
        seen["dt"] = out.dtype  # returns None: the output is left as it is

    def look(info):
        if info.step == 0:  # the model exists now: watch the next forward's output head
            info.model.lm_head.register_forward_hook(record)
        seen["eps"] = {g["eps"] for g in info.optimizer.param_groups}

    result = train(TrainConfig(**TINY, fp16=True, adam_eps=1e-12), callbacks=[look])
    assert seen == {"dt": torch.float16, "eps": {1e-12}}
    assert len(result.losses) == 3
    cfg = parse("--fp16", "--adam-eps", "1e-12", "--steps", "3")
    assert cfg.fp16 and not cfg.bf16 and cfg.adam_eps == 1e-12


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(fp16=True, bf16=True), "bf16 and fp16 are exclusive"),
        (dict(fp16="yes"), "fp16 must be true or false"),
        (dict(adam_eps=0), "adam_eps must be a number > 0"),
    ],
)
def test_bad_precision_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**TINY, **kwargs)
