"""The zoo's other loops, briefly: a user decoder under attach and a tiny Hugging Face model
under transformers.Trainer, each training on the byte corpus and reporting every probe."""

import math

import pytest

from logitwatch.agent.transport.sink import MemorySink
from logitwatch.agent.zoo.cases import ZooScale
from logitwatch.agent.zoo.trainers import train_attach

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALE = ZooScale(steps=30, every=3, seeds=1, corpus_bytes=50_000)


def check(sink, losses, first_step):
    assert len(losses) == SCALE.steps and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5  # it learns: from ln(256) = 5.5 down
    for layer in range(SCALE.n_layers):
        steps, _ = sink.series("attn.logit_max", layer=layer, head=0)
        assert steps[0] == first_step and len(steps) >= SCALE.steps // SCALE.every
    assert sink.series("logz.mean")[0]  # the output-logit probe found the head


def test_a_user_decoder_under_attach():
    sink = MemorySink()
    check(sink, train_attach(SCALE, 0, "zoo-attach", sink), first_step=0)


def test_a_tiny_llama_under_the_trainer():
    pytest.importorskip("transformers")
    from logitwatch.agent.zoo.trainers import train_hf

    sink = MemorySink()
    check(sink, train_hf("llama", SCALE, 0, "zoo-hf", sink), first_step=1)  # 1-based steps
