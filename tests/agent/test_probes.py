"""Each probe against a direct computation on a small reference decoder."""

import math

import pytest
import torch

from logitwatch.agent import Monitor, MonitorConfig
from logitwatch.agent.probes.reductions import attn_stats, even_rows, logits_stats
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.reference.optim import ClippedAdamW
from logitwatch.agent.transport.sink import MemorySink, series_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, T, B = 128, 16, 2


def tiny(**kw) -> Decoder:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=T)
    return Decoder(DecoderConfig(**{**cfg, **kw}))


def capture(model: Decoder) -> tuple[dict, list]:
    """Record each layer's q, k and the pre-cap logits with our own hooks."""
    qk, logits = {}, []
    for i, block in enumerate(model.blocks):
        block.attn.qk_hook.register_forward_hook(
            lambda m, a, o, i=i: qk.__setitem__(i, (a[0].detach(), a[1].detach()))
        )
    model.logits_hook.register_forward_hook(lambda m, a, o: logits.append(o.detach()))
    return qk, logits


def direct_attn(q, k, scale, rows):
    """Hand computation: expand kv heads, full q·kᵀ·scale, causal mask; the max |logit| over
    every row, the entropies over ``rows``."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    causal = torch.ones(q.size(2), k.size(2), dtype=torch.bool).tril()
    abs_max = att.abs().masked_fill(~causal, 0.0).amax(dim=(0, 2, 3))  # (H,)
    att = att.masked_fill(~causal, float("-inf"))[:, :, rows]  # (B, H, R, T)
    p = torch.softmax(att, -1)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # (B, H, R)
    n_keys = torch.tensor([r + 1 for r in rows])
    keep = n_keys >= 2
    per_head = ent[:, :, keep].mean(dim=(0, 2))
    frac = (ent[:, :, keep] / n_keys[keep].float().log()).mean()
    return abs_max, per_head, frac


def record_weights(model, opt) -> tuple[list, list]:
    """Each optimizer step's weights before it and after it, as ``opt``'s hooks see them."""
    before, after = [], []
    opt.register_step_pre_hook(
        lambda o, a, k: before.append([p.detach().clone() for p in model.parameters()])
    )
    opt.register_step_post_hook(
        lambda o, a, k: after.append([p.detach().clone() for p in model.parameters()])
    )
    return before, after


def step_ratio(before: list, after: list) -> float:
    """||w after - w before|| / ||w before|| over every weight."""
    d = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(after, before, strict=True)))
    return d / math.sqrt(sum(float(b.pow(2).sum()) for b in before))


def train(model, opt, monitor=None, steps=3, seed=1):
    torch.manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, V, (B, T))
        ce, z = loss_fn(model(idx), idx, z_loss=1e-4)
        (ce + z).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float((ce + z).detach()))
        if monitor is not None:
            monitor.step(step, loss=ce + z, loss_z=z, tokens=idx.numel())
    return losses


def test_attention_probes_match_direct_computation():
    model, sink = tiny(qk_norm=True, softcap_attn=50.0), MemorySink()
    qk, _ = capture(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Monitor(model, opt, run="t", sink=sink) as monitor:
        train(model, opt, monitor, steps=1)
    values = sink.rows[0][2]
    for layer, (q, k) in qk.items():
        scale = model.blocks[layer].attn.scale
        mx, per_head, frac = direct_attn(q, k, scale, list(range(T)))
        for h in range(4):
            got = values[series_key("attn.logit_max", layer=layer, head=h)]
            assert got == pytest.approx(float(mx[h]), rel=1e-5)
        assert values[series_key("attn.entropy_min", layer=layer)] == pytest.approx(
            float(per_head.min()), rel=1e-5
        )
        assert values[series_key("attn.entropy_mean", layer=layer)] == pytest.approx(
            float(per_head.mean()), rel=1e-5
        )
        assert values[series_key("attn.entropy_frac", layer=layer)] == pytest.approx(
            float(frac), rel=1e-5
        )
        assert values[series_key("attn.q_norm", layer=layer)] == pytest.approx(
            float(q.pow(2).mean().sqrt()), rel=1e-5
        )
        assert values[series_key("attn.k_norm", layer=layer)] == pytest.approx(
            float(k.pow(2).mean().sqrt()), rel=1e-5
        )


def test_attention_max_is_exact_while_entropy_samples_rows_and_padding_mask():
    torch.manual_seed(0)
    q, k = torch.randn(3, 4, T, 8) * 3, torch.randn(3, 2, T, 8) * 3
    rows = even_rows(T, 5, q.device).tolist()
    assert len(rows) == 5 and rows[0] == 0 and rows[-1] == T - 1
    out = attn_stats(q, k, 0.125, sample_rows=5, sample_batch=None)
    mx, per_head, frac = direct_attn(q, k, 0.125, rows)
    torch.testing.assert_close(out[:4], mx)  # max |logit| over all rows, not the sampled five
    torch.testing.assert_close(out[4:7], torch.stack([per_head.min(), per_head.mean(), frac]))
    # A padding mask that hides the first 3 keys of batch item 0 (bool "may attend").
    mask = torch.ones(3, 1, T, T, dtype=torch.bool)
    mask[0, :, :, :3] = False
    masked = attn_stats(q, k, 0.125, sample_rows=T, sample_batch=None, mask=mask)
    att = (q @ k.repeat_interleave(2, 1).transpose(-2, -1)) * 0.125
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & mask
    torch.testing.assert_close(masked[:4], att.abs().masked_fill(~allowed, 0.0).amax(dim=(0, 2, 3)))
    assert torch.isfinite(masked).all()  # fully masked rows (padding) are left out, not NaN


def test_logits_and_log_z_match_direct_computation():
    model, sink = tiny(softcap_final=30.0), MemorySink()
    _, logits = capture(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with Monitor(model, opt, run="t", sink=sink, config=MonitorConfig(sample_tokens=B * T)) as m:
        train(model, opt, m, steps=1)
    x, values = logits[0], sink.rows[0][2]
    log_z = torch.logsumexp(x.reshape(-1, V), -1)
    expect = {
        "logits.max_abs": x.abs().max(),
        "logits.rms": x.pow(2).mean().sqrt(),
        "logits.mean": x.mean(),
        "logz.mean": log_z.mean(),
        "logz.std": log_z.std(correction=0),
        "logz.max": log_z.max(),
        "logz.min": log_z.min(),
    }
    for name, want in expect.items():
        assert values[series_key(name)] == pytest.approx(float(want), rel=1e-5, abs=1e-7), name
    assert values[series_key("nonfinite.count")] == 0.0


def test_sampled_log_z_uses_evenly_spaced_tokens():
    x = torch.randn(4, 32, V)
    out = logits_stats(x, sample_tokens=10)
    rows = even_rows(4 * 32, 10, x.device)
    log_z = torch.logsumexp(x.reshape(-1, V)[rows], -1)
    torch.testing.assert_close(
        out[3:7], torch.stack([log_z.mean(), log_z.std(correction=0), log_z.max(), log_z.min()])
    )


def test_grad_norm_is_read_before_clipping_and_update_ratio():
    model, sink = tiny(), MemorySink()
    opt = ClippedAdamW(model.parameters(), lr=1e-2, clip_grad_norm=1e-3)  # clips hard
    grads = []
    opt.register_step_pre_hook(
        lambda o, a, k: grads.append([p.grad.clone() for p in model.parameters()])
    )
    before, after = record_weights(model, opt)
    config = MonitorConfig(param_every=1)  # weights read every step, as well as reported
    with Monitor(model, opt, run="t", sink=sink, config=config) as monitor:
        train(model, opt, monitor, steps=2)
    values = sink.rows[0][2]
    names = [n for n, _ in model.named_parameters()]
    copy = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads[0]]
    for p, g in zip(copy, grads[0], strict=True):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(copy, max_norm=1e-3)
    assert values[series_key("grad.norm")] == pytest.approx(float(total), rel=1e-5)
    assert float(total) > 1e-2  # so a post-clip reading would be visibly wrong
    for layer in range(2):
        mine = [i for i, n in enumerate(names) if n.startswith(f"blocks.{layer}.")]
        want = math.sqrt(sum(float(grads[0][i].pow(2).sum()) for i in mine))
        assert values[series_key("grad.norm", layer=layer)] == pytest.approx(want, rel=1e-5)
        d = math.sqrt(sum(float((after[0][i] - before[0][i]).pow(2).sum()) for i in mine))
        w = math.sqrt(sum(float(before[0][i].pow(2).sum()) for i in mine))
        assert values[series_key("update.ratio", layer=layer)] == pytest.approx(d / w, rel=1e-4)
        pn = math.sqrt(sum(float(after[0][i].pow(2).sum()) for i in mine))
        assert values[series_key("param.norm", layer=layer)] == pytest.approx(pn, rel=1e-5)
    for step in (0, 1):  # step 1 reuses step 0's weight norms as ||w_prev||
        want = step_ratio(before[step], after[step])
        assert sink.rows[step][2][series_key("update.ratio")] == pytest.approx(want, rel=1e-4)


def test_update_ratio_every_step_with_the_kept_snapshot_and_weights_moved_between_steps():
    """Reporting every step, the update ratio's snapshot is the copy the previous report kept;
    weights written between steps (in place, or ``p.data`` swapped) are copied afresh, so the
    ratio stays ||w after - w before|| / ||w before|| of each optimizer step."""
    model, sink = tiny(), MemorySink()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before, after = record_weights(model, opt)
    first = next(model.parameters())
    with Monitor(model, opt, run="t", sink=sink, config=MonitorConfig(param_every=1)) as monitor:
        for step in range(5):
            if step == 2:
                with torch.no_grad():
                    first.mul_(0.5)  # outside the optimizer: a new version
            if step == 3:
                first.data = first.data.clone().add_(1.0)  # new storage, same version
            idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(step))
            ce, z = loss_fn(model(idx), idx, z_loss=0.0)
            (ce + z).backward()
            opt.step()
            opt.zero_grad()
            monitor.step(step, loss=ce)
    ratios = sink.series("update.ratio")[1]
    assert len(ratios) == 5
    for step in range(5):
        assert ratios[step] == pytest.approx(step_ratio(before[step], after[step]), rel=1e-4)
        norm = math.sqrt(sum(float(a.pow(2).sum()) for a in after[step]))
        assert sink.series("param.norm")[1][step] == pytest.approx(norm, rel=1e-5), step


def test_weights_are_read_every_param_every_steps():
    """By default the weights are read every 10th step (a multiple of every): the update
    ratio there is still that one optimizer step's ||w after - w before|| / ||w before||."""
    model, sink = tiny(), MemorySink()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before, after = record_weights(model, opt)
    assert MonitorConfig(every=3).weights_every == 12
    with Monitor(model, opt, run="t", sink=sink, every=1) as monitor:
        losses = train(model, opt, monitor, steps=21)
    assert sink.series("loss")[0] == list(range(21))
    assert len(losses) == 21
    steps, ratios = sink.series("update.ratio")
    assert steps == [0, 10, 20] and sink.series("param.norm")[0] == [0, 10, 20]
    for step, ratio in zip(steps, ratios, strict=True):
        assert ratio == pytest.approx(step_ratio(before[step], after[step]), rel=1e-4), step


@pytest.mark.parametrize("bad", [0, 5, 2.0, True])
def test_param_every_must_be_a_multiple_of_every(bad):
    with pytest.raises(ValueError, match=r"param_every must be None or a multiple of every=2"):
        MonitorConfig(every=2, param_every=bad)


def test_loss_lr_and_nonfinite_count():
    model, sink = tiny(), MemorySink()
    opt = torch.optim.AdamW(
        [
            {"params": list(model.blocks.parameters()), "name": "blocks"},
            {"params": [p for n, p in model.named_parameters() if not n.startswith("blocks.")]},
        ],
        lr=3e-4,
    )
    with Monitor(model, opt, run="t", sink=sink) as monitor:
        losses = train(model, opt, monitor, steps=2)
        monitor.step(2, loss=torch.tensor(float("nan")))
    assert sink.series("loss")[1][:2] == pytest.approx(losses, rel=1e-6)
    assert sink.series("loss.z")[1][0] > 0
    assert sink.series("lr", group="blocks")[1] == [3e-4, 3e-4, 3e-4]
    assert sink.series("lr", group="1")[1][0] == 3e-4
    assert sink.series("nonfinite.count")[1] == [0.0, 0.0, 1.0]
    assert sink.series("throughput.tokens_per_s")[1][0] > 0


def test_clipping_optimizers_own_norms_are_read_not_the_gradients_again(monkeypatch):
    """ClippedAdamW takes every gradient's norm before it clips: the Monitor reports those
    (the same values as reading the gradients itself) instead of a second pass over them."""
    from logitwatch.agent.probes import optim as probes_optim

    reads = []
    original = probes_optim.ParamStats._sq_norms
    monkeypatch.setattr(
        probes_optim.ParamStats,
        "_sq_norms",
        lambda self, ts: reads.append(len(ts)) or original(self, ts),
    )
    model, sink = tiny(), MemorySink()
    opt = ClippedAdamW(model.parameters(), lr=1e-2, clip_grad_norm=1e-3)
    grads = []
    opt.register_step_pre_hook(
        lambda o, a, k: grads.append([p.grad.clone() for p in model.parameters()])
    )
    config = MonitorConfig(probes=("loss", "grad"))
    with Monitor(model, opt, run="t", sink=sink, config=config) as monitor:
        train(model, opt, monitor, steps=3)
    assert reads == []  # no gradient was read by the Monitor
    assert len(sink.rows) == 3
    for (_, _, values), step_grads in zip(sink.rows, grads, strict=True):
        want = math.sqrt(sum(float(g.pow(2).sum()) for g in step_grads))
        assert values[series_key("grad.norm")] == pytest.approx(want, rel=1e-5)
        assert values[series_key("nonfinite.count")] == 0.0
