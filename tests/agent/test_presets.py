"""Presets: the published sizes hold the published parameter counts; small sizes keep the ratios."""

import json

import pytest
import torch

from logitwatch.agent import PRESETS, Decoder, get_preset, loss_fn
from logitwatch.agent.reference.presets import preset_params
from logitwatch.cli import main

DECODER_ONLY = {"gpt3": 175e9, "lamda": 137e9, "palm": 540e9, "llama2": 70e9}


@pytest.fixture(scope="module")
def full_params() -> dict[str, int]:
    return {name: preset_params(get_preset(name, full=True)) for name in PRESETS}


def test_names():
    assert list(PRESETS) == ["gpt3", "t5", "t5-v1.1", "lamda", "palm", "llama2"]


@pytest.mark.parametrize("name, published", DECODER_ONLY.items())
def test_full_decoder_only_param_count_within_5_percent(full_params, name, published):
    assert PRESETS[name].published_params == published
    assert abs(full_params[name] / published - 1) < 0.05


@pytest.mark.parametrize("name", ["t5", "t5-v1.1"])
def test_t5_stack_holds_its_layers_and_lacks_only_cross_attention(full_params, name):
    c = get_preset(name, full=True)
    inner = c.n_heads * c.head_dim
    attn = 4 * c.d_model * inner  # q, k, v, o; no biases
    ffn = (3 if c.ffn == "geglu" else 2) * c.d_model * c.d_ff
    norms = 2 * c.d_model
    embed = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    assert c.n_layers == 48  # 24 encoder + 24 decoder layers
    assert full_params[name] == c.n_layers * (attn + ffn + norms) + embed + c.d_model
    # With the decoder's 24 cross-attention sublayers back, the original's ~11B.
    assert PRESETS[name].missing_params == 24 * attn
    assert abs((full_params[name] + PRESETS[name].missing_params) / 11e9 - 1) < 0.05
    assert "encoder-decoder" in PRESETS[name].doc


def test_published_shapes_from_the_lecture_table():
    shapes = {n: get_preset(n, full=True) for n in PRESETS}
    got = {n: (c.n_heads, c.head_dim, c.d_model) for n, c in shapes.items()}
    assert got == {
        "gpt3": (96, 128, 12288),
        "t5": (128, 128, 1024),
        "t5-v1.1": (64, 64, 4096),
        "lamda": (128, 128, 8192),
        "palm": (48, 256, 18432),  # the paper's 256, not the lecture's 258
        "llama2": (64, 128, 8192),
    }
    assert (shapes["palm"].n_kv_heads, shapes["llama2"].n_kv_heads) == (1, 8)
    assert "258" in PRESETS["palm"].doc and "0.67" in PRESETS["palm"].doc


@pytest.mark.parametrize("name", list(PRESETS))
def test_small_keeps_the_ratios_and_choices(name):
    full, small = get_preset(name, full=True), get_preset(name)
    for cfg_attr in ("ffn", "norm", "pos", "bias", "tie_embeddings", "z_loss"):
        assert getattr(small, cfg_attr) == getattr(full, cfg_attr), cfg_attr
    assert (
        small.n_heads * small.head_dim * full.d_model
        == full.n_heads * full.head_dim * small.d_model
    )
    assert small.d_ff * full.d_model == full.d_ff * small.d_model
    # The attention kind survives: multi-head, grouped-query or multi-query.
    kind = lambda c: "mqa" if c.n_kv_heads == 1 else "gqa" if c.n_kv_heads < c.n_heads else "mha"  # noqa: E731
    assert kind(small) == kind(full)
    assert small.n_layers <= 4 and small.d_model <= 256 and small.vocab_size == 256


@pytest.mark.parametrize("name", list(PRESETS))
def test_small_presets_train_a_step(name):
    torch.manual_seed(0)
    model = Decoder(get_preset(name, vocab_size=64, max_seq_len=32))
    idx = torch.randint(0, 64, (2, 32))
    ce, z = loss_fn(model(idx)[:, :-1], idx[:, 1:], model.config.z_loss)
    (ce + z).backward()
    assert torch.isfinite(ce) and abs(ce.item() - torch.log(torch.tensor(64.0)).item()) < 1.0


def test_overrides_and_bad_names():
    assert get_preset("llama2", vocab_size=1000, qk_norm=True).vocab_size == 1000
    with pytest.raises(ValueError, match=r"unknown preset 'gpt4'.*gpt3, t5, t5-v1.1"):
        get_preset("gpt4")
    with pytest.raises(ValueError, match="'n_head'"):
        get_preset("gpt3", n_head=2)
    with pytest.raises(ValueError, match="dropout_attn"):
        get_preset("gpt3", dropout_attn=-0.5)


def test_cli_presets_json(capsys):
    assert main(["presets", "--full", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(PRESETS)
    for key in ("n_layers", "d_model", "n_heads", "head_dim", "d_ff", "ffn", "params"):
        assert all(key in r for r in rows)
    palm = rows[4]
    assert (palm["head_dim"], round(palm["head_ratio"], 2), palm["ffn"]) == (256, 0.67, "swiglu")


def test_cli_presets_table(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert "16.00" in out and "64.00" in out  # t5's head and d_ff ratios
