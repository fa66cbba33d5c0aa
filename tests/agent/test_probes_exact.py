"""The attention maximum is exact — every batch item, query row and key — and means one thing:
the largest magnitude max |q·k/√d| of the pre-softmax logit, computed in bounded chunks."""

import pytest
import torch

from logitwatch.agent import Monitor, MonitorConfig
from logitwatch.agent.probes.reductions import _plan, attn_logit_absmax, attn_stats, spaced
from logitwatch.agent.reference.decoder import Decoder, DecoderConfig, loss_fn
from logitwatch.agent.transport.sink import MemorySink, series_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def direct(q, k, scale, causal=True, mask=None):
    """Per-head max |logit| from the full (B, H, Tq, Tk) logits, the way the decoder makes them."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    Tq, Tk = q.size(2), k.size(2)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(Tk - Tq)  # a KV cache of Tk - Tq keys precedes the queries
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else mask > -1e30)
    return att.abs().masked_fill(~allowed, 0.0).amax(dim=(0, 2, 3))  # (H,)


@pytest.mark.parametrize(
    ("B", "H", "Hkv", "Tq", "Tk"),
    [
        (3, 4, 2, 16, 16),
        (2, 4, 1, 7, 20),
        (5, 6, 3, 97, 97),
        (1, 2, 2, 130, 130),
        (2, 8, 2, 256, 256),
    ],
    ids=["gqa", "mqa-kv-cache", "odd-rows", "long", "gqa-row-chunks"],
)
@pytest.mark.parametrize("chunk", [None, 64, 1000], ids=["default", "tiny", "small"])
@pytest.mark.parametrize("heads_first", [True, False], ids=["bhtd", "bthd-transposed"])
def test_exact_max_matches_the_full_logits_whatever_the_chunks(
    B, H, Hkv, Tq, Tk, chunk, heads_first
):
    torch.manual_seed(0)
    q, k = torch.randn(B, H, Tq, 8) * 3, torch.randn(B, Hkv, Tk, 8) * 3
    if not heads_first:  # the strided q and k of (B, T, H, hs).transpose(1, 2)
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    for causal in (True, False):
        got = attn_logit_absmax(q, k, 0.3, causal=causal, chunk_elems=chunk)
        torch.testing.assert_close(got, direct(q, k, 0.3, causal))
    bool_mask = torch.rand(B, 1, Tq, Tk) > 0.3  # padding-like: hides keys per batch item
    additive = torch.zeros(1, H, Tq, Tk).masked_fill_(torch.rand(1, H, Tq, Tk) > 0.5, -1e9)
    for mask in (bool_mask, additive):
        got = attn_logit_absmax(q, k, 0.3, mask=mask, chunk_elems=chunk)
        torch.testing.assert_close(got, direct(q, k, 0.3, mask=mask))


def test_chunks_stay_within_the_budget_and_causal_chunks_skip_hidden_keys():
    for B, H, T, budget in [(16, 4, 128, 1 << 18), (8, 32, 8192, 1 << 20), (2, 8, 300, 5000)]:
        bc, rc = _plan(B, H, T, T, True, budget)
        assert bc * H * rc * T <= max(budget, H * T)  # one row of every head at the least
        assert rc <= -(-T // 4)  # at least four row chunks: later keys are never multiplied
    assert _plan(4, 2, 16, 16, False, 1 << 20) == (4, 16)  # small: one chunk


def test_a_spike_outside_any_sample_is_found():
    """The issue's case: T 128, batch 16; one logit far above the rest, in a batch item and a
    query row that the old sample (first 4 items, 64 rows) never read."""
    torch.manual_seed(0)
    B, H, T, hs = 16, 4, 128, 16
    q, k = torch.randn(B, H, T, hs), torch.randn(B, H, T, hs)
    q[13, 2, 77] = k[13, 2, 40] = 6.0  # q·k/√hs = 6·6·16/4 = 144 at row 77, key 40
    want = direct(q, k, hs**-0.5)
    got = attn_stats(q, k, hs**-0.5, sample_rows=64, sample_batch=4)
    torch.testing.assert_close(got[:H], want)
    assert float(got[2]) == pytest.approx(144.0, rel=1e-5)


def test_all_negative_logits_report_their_magnitude():
    """A head whose logits are all negative (q = -k) reads max |x|, not the signed max."""
    k = torch.ones(1, 1, 4, 16)
    q = -2.0 * k  # every logit is -2·16/4 = -8
    out = attn_stats(q, k, 0.25, sample_rows=4)
    assert float(out[0]) == pytest.approx(8.0)


def test_sampled_entropy_is_the_same_in_batch_chunks_and_with_a_padding_mask():
    torch.manual_seed(0)
    q, k = torch.randn(6, 4, 32, 8) * 2, torch.randn(6, 2, 32, 8) * 2
    mask = torch.ones(6, 1, 32, 32, dtype=torch.bool)
    mask[1, :, :, :5] = False
    for m in (None, mask):
        whole = attn_stats(q, k, 0.3, sample_rows=9, sample_batch=5, mask=m)
        chunked = attn_stats(q, k, 0.3, sample_rows=9, sample_batch=5, mask=m, chunk_elems=300)
        torch.testing.assert_close(chunked, whole)


def direct_entropy(q, k, scale, rows, n_batch, causal=True, mask=None):
    """Entropy min/mean/frac over ``rows`` of the first ``n_batch`` items, from full logits."""
    q, k = q[:n_batch], k[:n_batch].repeat_interleave(q.size(1) // k.size(1), dim=1)
    Tq, Tk = q.size(2), k.size(2)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(Tk - Tq)
    if mask is not None:
        allowed = allowed & mask[:n_batch]
    allowed = allowed.expand(n_batch, q.size(1), Tq, Tk)[:, :, rows]  # (b, H, R, Tk)
    att = ((q @ k.transpose(-2, -1)) * scale)[:, :, rows].masked_fill(~allowed, float("-inf"))
    p = torch.softmax(att, -1).nan_to_num(0.0)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # (b, H, R)
    n_keys = allowed.sum(-1)
    w = (n_keys >= 2).float()
    per_head = (ent * w).sum((0, 2)) / w.sum((0, 2))
    frac = (ent / n_keys.clamp_min(2).float().log() * w).sum() / w.sum()
    return torch.stack([per_head.min(), per_head.mean(), frac])


@pytest.mark.parametrize("chunk", [None, 300, 5000], ids=["default", "tiny", "small"])
def test_sampled_entropy_matches_the_full_softmax_in_any_chunks(chunk):
    """The sampled rows' entropies, in chunks of rows: every chunk size, kv-cache offset,
    mask and memory layout gives what the full softmax gives, and the q/k RMS what the
    whole tensors give."""
    torch.manual_seed(0)
    B, H, Hkv, Tq, Tk = 5, 4, 2, 70, 90
    q, k = torch.randn(B, H, Tq, 8) * 2, torch.randn(B, Hkv, Tk, 8) * 2
    rows = spaced(Tq, 9)
    mask = torch.rand(B, 1, Tq, Tk) > 0.2
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k)]
    for (qq, kk), causal, m in [
        ((q, k), True, None),
        ((q, k), False, None),
        ((q, k), True, mask),
        (strided, True, None),
    ]:
        got = attn_stats(
            qq, kk, 0.3, sample_rows=9, sample_batch=3, causal=causal, mask=m, chunk_elems=chunk
        )
        want = direct_entropy(q, k, 0.3, rows, 3, causal, m)
        torch.testing.assert_close(got[H : H + 3], want)
        rms = torch.stack([q.pow(2).mean().sqrt(), k.pow(2).mean().sqrt()])
        torch.testing.assert_close(got[H + 3 :], rms)


def test_monitor_reports_the_exact_max_of_every_head_and_per_layer():
    torch.manual_seed(0)
    T, B = 128, 16
    cfg = DecoderConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=T)
    qk = {}
    sinks = []
    for per_head in (True, False):
        torch.manual_seed(0)
        model = Decoder(cfg)
        for i, block in enumerate(model.blocks):
            block.attn.qk_hook.register_forward_hook(
                lambda m, a, o, i=i: qk.__setitem__(i, (a[0].detach(), a[1].detach()))
            )
        sink = MemorySink()
        config = MonitorConfig(sample_rows=64, sample_batch=4, per_head=per_head)
        with Monitor(model, run="x", sink=sink, config=config) as monitor:
            idx = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))
            loss_fn(model(idx), idx, 0.0)[0].backward()
            monitor.step(0, loss=1.0)
        sinks.append(sink.rows[0][2])
    per_head_values, per_layer_values = sinks
    for layer, (q, k) in qk.items():
        want = direct(q, k, model.blocks[layer].attn.scale)
        for h in range(4):
            got = per_head_values[series_key("attn.logit_max", layer=layer, head=h)]
            assert got == pytest.approx(float(want[h]), rel=1e-5)
        got = per_layer_values[series_key("attn.logit_max", layer=layer)]
        assert got == pytest.approx(float(want.max()), rel=1e-5)


def test_the_max_is_exact_under_the_models_bf16_autocast():
    """The probes run inside the model's forward: autocast must not cast their matmuls down
    (it rounded every logit to bf16, the max 0.2 % off)."""
    torch.manual_seed(0)
    T, B = 64, 4
    cfg = DecoderConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=4, max_seq_len=T)
    model, qk, sink = Decoder(cfg), {}, MemorySink()
    model.blocks[0].attn.qk_hook.register_forward_hook(
        lambda m, a, o: qk.__setitem__(0, (a[0].detach(), a[1].detach()))
    )
    with Monitor(model, run="x", sink=sink, config=MonitorConfig(per_head=False)) as monitor:
        idx = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(idx), idx, 0.0)[0]
        loss.backward()
        monitor.step(0, loss=1.0)
    q, k = qk[0]
    assert q.dtype == torch.bfloat16  # the autocast reached q and k
    want = direct(q.float(), k.float(), model.blocks[0].attn.scale).max()
    got = sink.rows[0][2][series_key("attn.logit_max", layer=0)]
    assert got == pytest.approx(float(want), rel=1e-6)


def test_attn_chunk_is_checked_by_name():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="attn_chunk"):
            MonitorConfig(attn_chunk=bad)
    assert MonitorConfig(attn_chunk=4096).attn_chunk == 4096
