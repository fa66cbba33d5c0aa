"""DecoderConfig: defaults resolved, bad values refused with a sentence naming the field."""

import pytest

from logitwatch.agent import DecoderConfig


def test_none_fields_resolve():
    cfg = DecoderConfig(d_model=128, n_heads=4, ffn="gelu")
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.d_ff) == (32, 4, 512)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dropout_attn": -0.1}, "dropout_attn"),
        ({"dropout_resid": 1.0}, "dropout_resid"),
        ({"head_dim": 7}, "head_dim"),
        ({"softcap_attn": 0.0}, "softcap_attn"),
        ({"softcap_final": -3.0}, "softcap_final"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"n_heads": 3}, "n_heads"),
        ({"ffn": "mish"}, "ffn"),
        ({"norm": "batch"}, "norm"),
        ({"pos": "alibi"}, "pos"),
        ({"attn_impl": "flash"}, "attn_impl"),
        ({"z_loss": -1e-4}, "z_loss"),
        ({"z_loss": float("nan")}, "z_loss"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"qk_norm": "yes"}, "qk_norm"),
        ({"init_std": 0}, "init_std"),
        ({"attn_impl": "sdpa", "softcap_attn": 50.0}, "sdpa"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DecoderConfig(**kwargs)


def test_odd_head_dim_allowed_with_learned_positions():
    assert DecoderConfig(head_dim=7, pos="learned").head_dim == 7


def test_dict_round_trip_and_unknown_key():
    cfg = DecoderConfig(n_kv_heads=1, softcap_attn=50.0, z_loss=1e-4)
    assert DecoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"'n_head'.*allowed: vocab_size") as err:
        DecoderConfig.from_dict({"n_head": 4})
    assert "n_heads" in str(err.value)
