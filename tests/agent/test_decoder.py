"""Each technique of the reference decoder checked against its direct formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from logitwatch.agent import Decoder, DecoderConfig, HookPoint, loss_fn
from logitwatch.agent.reference.decoder import MLP, RMSNorm, apply_rope, rope_tables

SMALL = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=16)


def _model(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(**{**SMALL, **overrides})).eval()


def _idx(B: int = 2, T: int = 12, V: int = 64) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def _capture(model: Decoder, name: str, idx: torch.Tensor):
    """Run the model and return what the hook point ``name`` passed on."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(idx)
    handle.remove()
    return seen[0]


def _rms(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(norm(x), _rms(x) * torch.arange(1.0, 9.0))


def test_layernorm_selectable():
    model = _model(norm="layer", bias=True)
    assert isinstance(model.blocks[0].norm_attn, torch.nn.LayerNorm)
    assert model.blocks[0].norm_attn.bias is not None
    assert isinstance(_model().blocks[0].norm_attn, RMSNorm)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_is_rmsnorm_per_head(qk_norm):
    model = _model(qk_norm=qk_norm, pos="learned")
    idx = _idx()
    attn = model.blocks[0].attn
    if qk_norm:
        with torch.no_grad():  # non-trivial gains, so the test sees them applied
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
    q, k = _capture(model, "blocks.0.attn.qk_hook", idx)
    with torch.no_grad():
        x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.size(1)))
        h = model.blocks[0].norm_attn(x)
        q_raw = attn.wq(h).view(2, 12, 4, 8).transpose(1, 2)
        k_raw = attn.wk(h).view(2, 12, 4, 8).transpose(1, 2)
    if qk_norm:
        q_raw = _rms(q_raw) * attn.q_norm.weight.detach()
        k_raw = _rms(k_raw) * attn.k_norm.weight.detach()
    torch.testing.assert_close(q, q_raw)
    torch.testing.assert_close(k, k_raw)


def test_rope_rotates_each_pair_by_position_angle():
    head_dim, theta = 8, 10000.0
    cos, sin = rope_tables(head_dim, 16, theta)
    x = torch.randn(1, 2, 10, head_dim)
    out = apply_rope(x, cos, sin)
    for m in (0, 3, 9):
        for i in range(head_dim // 2):
            angle = m * theta ** (-2 * i / head_dim)
            a, b = x[..., m, 2 * i], x[..., m, 2 * i + 1]
            torch.testing.assert_close(
                out[..., m, 2 * i], a * math.cos(angle) - b * math.sin(angle)
            )
            torch.testing.assert_close(
                out[..., m, 2 * i + 1], a * math.sin(angle) + b * math.cos(angle)
            )


def test_rope_dot_product_depends_on_relative_position_only():
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    seq_q = apply_rope(q.expand(1, 1, 32, 8), cos, sin)[0, 0]  # q at every position
    seq_k = apply_rope(k.expand(1, 1, 32, 8), cos, sin)[0, 0]
    torch.testing.assert_close(seq_q[5] @ seq_k[2], seq_q[20] @ seq_k[17])


def test_final_softcap_applies_c_tanh_to_hooked_logits():
    model = _model(softcap_final=2.0, init_std=0.5)
    idx = _idx()
    raw = _capture(model, "logits_hook", idx)
    with torch.no_grad():
        out = model(idx)
    assert raw.abs().max() > 2.0  # the cap is actually exercised
    torch.testing.assert_close(out, 2.0 * torch.tanh(raw / 2.0))
    assert out.abs().max() <= 2.0


def test_attention_softcap_matches_formula():
    model = _model(softcap_attn=0.5, init_std=0.3)
    attn = model.blocks[0].attn
    assert not attn.use_sdpa
    x = torch.randn(2, 12, 32)
    T, scale = 12, 1 / math.sqrt(8)
    with torch.no_grad():
        q = attn.wq(x).view(2, T, 4, 8).transpose(1, 2)
        k = attn.wk(x).view(2, T, 4, 8).transpose(1, 2)
        v = attn.wv(x).view(2, T, 4, 8).transpose(1, 2)
        q, k = (
            apply_rope(q, model.rope_cos, model.rope_sin),
            apply_rope(k, model.rope_cos, model.rope_sin),
        )
        s = 0.5 * torch.tanh((q @ k.transpose(-1, -2)) * scale / 0.5)
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(2, T, 32)
        expected = attn.wo(y)
        got = attn(x, model.rope_cos, model.rope_sin)
    torch.testing.assert_close(got, expected)


def test_loss_fn_ce_and_z_loss_in_fp32():
    logits = (torch.randn(2, 5, 11) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 11, (2, 5))
    ce, z = loss_fn(logits, targets, z_loss=1e-4)
    assert ce.dtype == torch.float32 and z.dtype == torch.float32
    flat = logits.float().view(-1, 11)
    torch.testing.assert_close(ce, F.cross_entropy(flat, targets.view(-1)))
    lse = torch.log(torch.exp(flat).sum(-1))
    torch.testing.assert_close(z, 1e-4 * (lse**2).mean())
    _, z_off = loss_fn(logits, targets, z_loss=0.0)
    assert z_off.item() == 0.0


def test_z_loss_ignores_padded_targets():
    logits = torch.randn(1, 4, 7)
    targets = torch.tensor([[1, 2, -100, -100]])
    _, z = loss_fn(logits, targets, z_loss=1.0)
    torch.testing.assert_close(z, (torch.logsumexp(logits[0, :2], -1) ** 2).mean())


@pytest.mark.parametrize(
    "ffn, act",
    [("swiglu", F.silu), ("geglu", F.gelu), ("reglu", F.relu), ("relu", F.relu), ("gelu", F.gelu)],
)
def test_ffn_kinds_match_formula(ffn, act):
    torch.manual_seed(0)
    cfg = DecoderConfig(**{**SMALL, "ffn": ffn, "d_ff": 48})
    mlp = MLP(cfg)
    x = torch.randn(2, 3, 32)
    W_in, W_out = mlp.w_in.weight, mlp.w_out.weight
    if ffn in ("swiglu", "geglu", "reglu"):
        expected = (act(x @ mlp.w_gate.weight.T) * (x @ W_in.T)) @ W_out.T
    else:
        assert mlp.w_gate is None
        expected = act(x @ W_in.T) @ W_out.T
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize(
    "d_model, ffn, d_ff",
    [(128, "relu", 512), (128, "swiglu", 341), (768, "swiglu", 2048), (256, "geglu", 704)],
)
def test_default_d_ff(d_model, ffn, d_ff):
    assert DecoderConfig(d_model=d_model, n_heads=4, ffn=ffn).d_ff == d_ff
    assert DecoderConfig(d_model=d_model, n_heads=4, ffn=ffn, d_ff=100).d_ff == 100


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_gqa_equals_mha_with_repeated_kv_heads(attn_impl):
    gqa = _model(n_kv_heads=2, attn_impl=attn_impl)
    mha = _model(n_kv_heads=4, attn_impl=attn_impl)
    state = gqa.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"blocks.{i}.attn.{w}.weight"  # (nkv*hs, C): repeat each head's rows
            state[key] = state[key].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = _idx()
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx))
    q, k = _capture(gqa, "blocks.1.attn.qk_hook", idx)
    assert q.shape == (2, 4, 12, 8) and k.shape == (2, 2, 12, 8)


@pytest.mark.parametrize("extra", [{}, {"n_kv_heads": 1, "qk_norm": True}, {"pos": "learned"}])
def test_sdpa_and_eager_paths_agree(extra):
    sdpa, eager = _model(attn_impl="sdpa", **extra), _model(attn_impl="eager", **extra)
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.blocks[0].attn.use_sdpa and not eager.blocks[0].attn.use_sdpa
    idx = _idx()
    with torch.no_grad():
        torch.testing.assert_close(sdpa(idx), eager(idx), rtol=1e-5, atol=1e-5)


def test_auto_uses_sdpa_unless_attention_softcap():
    assert _model().blocks[0].attn.use_sdpa
    assert not _model(softcap_attn=50.0).blocks[0].attn.use_sdpa


@pytest.mark.parametrize("extra", [{}, {"softcap_attn": 50.0}])
def test_causal_future_tokens_do_not_change_past_logits(extra):
    model = _model(**extra)
    idx = _idx()
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :8], model(changed)[:, :8])


def test_dropout_active_in_train_and_off_in_eval():
    model = _model(dropout_attn=0.3, dropout_resid=0.3, attn_impl="eager")
    idx = _idx()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx), rtol=0, atol=0)
        no_drop = _model(attn_impl="eager")  # same seed: same weights
        torch.testing.assert_close(model(idx), no_drop(idx))
        model.train()
        assert not torch.equal(model(idx), model(idx))


def test_tied_embeddings_share_storage():
    tied, untied = _model(tie_embeddings=True), _model(tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 64 * 32
    assert tied.num_params(non_embedding=True) == untied.num_params(non_embedding=True)


@pytest.mark.parametrize(
    "extra", [{}, {"softcap_attn": 30.0, "qk_norm": True, "softcap_final": 30.0}]
)
def test_bf16_autocast_trains_a_step(extra):
    model = _model(**extra).train()
    idx = _idx()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        ce, z = loss_fn(logits[:, :-1], idx[:, 1:], z_loss=1e-4)
    assert logits.dtype == torch.bfloat16
    (ce + z).backward()
    assert torch.isfinite(ce) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_hooks_do_not_change_outputs_and_carry_contract():
    model = _model(softcap_attn=20.0, softcap_final=10.0, n_kv_heads=2)
    idx = _idx()
    with torch.no_grad():
        before = model(idx)
    seen = {}
    handles = [
        m.register_forward_hook(lambda m, i, o, n=name: seen.setdefault(n, o))
        for name, m in model.named_modules()
        if isinstance(m, HookPoint)
    ]
    with torch.no_grad():
        after = model(idx)
    for h in handles:
        h.remove()
    assert torch.equal(before, after)
    assert set(seen) == {
        "logits_hook",
        *(f"blocks.{i}.attn.qk_hook" for i in range(2)),
        *(f"blocks.{i}.resid_hook" for i in range(2)),
    }
    hook = model.get_submodule("blocks.1.attn.qk_hook")
    assert (hook.kind, hook.layer, hook.scale, hook.softcap, hook.causal) == (
        "qk",
        1,
        1 / math.sqrt(8),
        20.0,
        True,
    )
    assert model.logits_hook.kind == "logits" and model.logits_hook.layer is None
    assert model.blocks[0].resid_hook.kind == "resid" and model.blocks[0].resid_hook.layer == 0
    assert seen["logits_hook"].shape == (2, 12, 64)
    assert seen["blocks.0.resid_hook"].shape == (2, 12, 32)
    t = torch.ones(2)
    assert HookPoint("resid")(t) is t


def test_block_parameters_live_under_block_prefix():
    names = [n for n, _ in _model().named_parameters()]
    assert any(n.startswith("blocks.1.attn.wq") for n in names)
    assert {n.split(".")[0] for n in names} == {"tok_emb", "blocks", "norm_final", "lm_head"}


def test_builds_on_meta_device():
    with torch.device("meta"):
        model = Decoder(DecoderConfig(vocab_size=32000, n_layers=8, d_model=1024, n_heads=8))
    assert next(model.parameters()).is_meta
    assert model.num_params() > 100_000_000


def test_sequence_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        _model()(torch.zeros(1, 17, dtype=torch.long))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_on_each_device_and_precision(device, dtype):
    model = _model(softcap_attn=50.0, n_kv_heads=2).to(device)
    fast = _model(n_kv_heads=2).to(device)
    idx = _idx().to(device)
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        for m in (model, fast):
            logits = m(idx)
            assert logits.device.type == device and logits.dtype == dtype
            assert torch.isfinite(logits).all()
