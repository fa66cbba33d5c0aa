"""Activation checkpointing: the recompute in backward fires the forward hooks again; the probes
must report what they report without checkpointing, and compute each reading once."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from logitwatch.agent import Monitor
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sink import MemorySink

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, T, B = 64, 16, 2


def tiny() -> Decoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=V, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=T
    )
    return Decoder(cfg)


def checkpointed(model: Decoder, reentrant: bool) -> Decoder:
    """Each block's forward under torch.utils.checkpoint, as training frameworks wrap blocks."""
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda x, cos, sin, f=forward: checkpoint(
            f, x, cos, sin, use_reentrant=reentrant
        )
    return model


def run(model: Decoder, steps: int = 3) -> tuple[MemorySink, dict[str, int], int]:
    """Train ``steps`` steps reporting each; count the qk hook's calls and the probe's readings."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sink, calls = MemorySink(), {"hook": 0}
    model.blocks[0].attn.qk_hook.register_forward_hook(
        lambda m, a, o: calls.__setitem__("hook", calls["hook"] + 1)
    )
    g = torch.Generator().manual_seed(1)
    with Monitor(model, opt, run="ckpt", sink=sink) as monitor:
        readings = {"n": 0}
        attn = monitor._probes._attn

        def counted(layer, qk):
            readings["n"] += layer == 0
            attn(layer, qk)

        monitor._probes._attn = counted
        for step in range(steps):
            idx = torch.randint(0, V, (B, T), generator=g)
            ce, z = loss_fn(model(idx), idx, z_loss=1e-4)
            (ce + z).backward()
            opt.step()
            opt.zero_grad()
            monitor.step(step, loss=ce + z, loss_z=z, tokens=idx.numel())
    return sink, calls, readings["n"]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_blocks_report_the_same_values_once(reentrant):
    plain, _, _ = run(tiny())
    sink, calls, readings = run(checkpointed(tiny(), reentrant))
    assert calls["hook"] == 6  # fired in forward and again in the recompute: 2 per step
    assert readings == 3  # ... but read once per step
    assert [s for s, _, _ in sink.rows] == [s for s, _, _ in plain.rows] == [0, 1, 2]
    for (_, _, want), (_, _, got) in zip(plain.rows, sink.rows, strict=True):
        skip = {k for k in want if k[0] == "throughput.tokens_per_s"}
        assert got.keys() == want.keys()
        assert any(k[0] == "attn.logit_max" for k in got)
        for key in want.keys() - skip:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
