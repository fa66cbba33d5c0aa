"""The lecture's model table as decoder presets: each published configuration (``full``) and a
small size with the same shape ratios that trains on a CPU in minutes.

>>> get_preset("llama2").n_kv_heads, get_preset("llama2", full=True).n_layers
(2, 80)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from logitwatch.agent.reference.decoder import Decoder, DecoderConfig

__all__ = ["PRESETS", "Preset", "get_preset", "preset_params", "preset_row"]


@dataclass(frozen=True)
class Preset:
    """One row of the table: shared choices, the published shape and a small shape."""

    name: str
    doc: str  # where the numbers come from and how the preset differs from the original
    source: str
    published_params: float  # as the paper states it
    common: dict[str, Any]  # ffn kind, norm, positions, bias, tying: the same in both sizes
    full: dict[str, Any]
    small: dict[str, Any]
    # Parameters the original has that a decoder-only stack cannot hold (T5's cross-attention).
    missing_params: float = 0.0


# Small sizes keep n_heads·head_dim/d_model, d_ff/d_model, FFN kind, norm and positions; the
# vocabulary is the trainer's byte-level 256 unless it passes its own.
_SMALL = dict(vocab_size=256, n_layers=4, max_seq_len=256)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="gpt3",
            doc="GPT-3 175B (Brown et al. 2020, table 2.1). Serial pre-LayerNorm blocks with "
            "biases, learned positions, tied embeddings, GELU at 4·d_model. The original "
            "alternated dense and locally banded sparse attention; here every layer is dense.",
            source="Brown et al. 2020, Language Models are Few-Shot Learners, table 2.1",
            published_params=175e9,
            common=dict(ffn="gelu", norm="layer", pos="learned", bias=True, tie_embeddings=True),
            full=dict(
                vocab_size=50257, n_layers=96, d_model=12288, n_heads=96, head_dim=128,
                d_ff=49152, max_seq_len=2048,
            ),
            small=dict(_SMALL, d_model=128, n_heads=4, head_dim=32, d_ff=512),
        ),
        Preset(
            name="t5",
            doc="T5 11B (XXL; Raffel et al. 2020): 128 heads of 128 on d_model 1024, so "
            "n_heads·head_dim/d_model = 16 and d_ff/d_model = 64, ReLU, RMS-style norm, no "
            "biases, tied embeddings. T5 is an encoder-decoder (24 + 24 layers); this preset "
            "stacks all 48 layers as decoder self-attention + FFN blocks, so it lacks the "
            "decoder's 24 cross-attention sublayers (about 1.6B parameters) and has ~9.7B. "
            "T5's bucketed relative position bias is replaced by RoPE, the nearest relative "
            "scheme here, and attention logits are scaled by 1/sqrt(head_dim) as usual.",
            source="Raffel et al. 2020, Exploring the Limits of Transfer Learning, table 14",
            published_params=11e9,
            common=dict(ffn="relu", norm="rms", pos="rope", bias=False, tie_embeddings=True),
            full=dict(
                vocab_size=32128, n_layers=48, d_model=1024, n_heads=128, head_dim=128,
                d_ff=65536, max_seq_len=512,
            ),
            small=dict(_SMALL, d_model=128, n_heads=16, head_dim=128, d_ff=8192),
            missing_params=24 * 4 * 1024 * 128 * 128,
        ),
        Preset(
            name="t5-v1.1",
            doc="T5 v1.1 XXL (Google's T5.1.1 checkpoints; Shazeer 2020 for GEGLU): d_model "
            "4096, 64 heads of 64, d_ff 10240 with GEGLU, untied embeddings, no biases. Also an "
            "encoder-decoder: as for `t5`, the 24 encoder and 24 decoder layers form one 48-layer decoder-only stack "
            "without cross-attention (about 1.6B fewer parameters) and with RoPE in place of "
            "relative position buckets.",
            source="google-research/text-to-text-transfer-transformer, released_checkpoints.md",
            published_params=11e9,
            common=dict(ffn="geglu", norm="rms", pos="rope", bias=False, tie_embeddings=False),
            full=dict(
                vocab_size=32128, n_layers=48, d_model=4096, n_heads=64, head_dim=64,
                d_ff=10240, max_seq_len=512,
            ),
            small=dict(_SMALL, d_model=128, n_heads=4, head_dim=32, d_ff=320),
            missing_params=24 * 4 * 4096 * 64 * 64,
        ),
        Preset(
            name="lamda",
            doc="LaMDA 137B (Thoppilan et al. 2022, section 3): decoder-only, 64 layers, "
            "d_model 8192, 128 heads of 128 (ratio 2), d_ff 65536 with gated GELU, relative "
            "attention as in T5, here RoPE. Norm and embedding tying are not stated; RMSNorm "
            "and tied embeddings follow T5, whose codebase LaMDA shares.",
            source="Thoppilan et al. 2022, LaMDA: Language Models for Dialog Applications, §3",
            published_params=137e9,
            common=dict(ffn="geglu", norm="rms", pos="rope", bias=False, tie_embeddings=True),
            full=dict(
                vocab_size=32000, n_layers=64, d_model=8192, n_heads=128, head_dim=128,
                d_ff=65536, max_seq_len=2048,
            ),
            small=dict(_SMALL, d_model=128, n_heads=8, head_dim=32, d_ff=1024),
        ),
        Preset(
            name="palm",
            doc="PaLM 540B (Chowdhery et al. 2022, table 1): 118 layers, d_model 18432, 48 heads "
            "of 256, one key/value head (multi-query), SwiGLU at d_ff = 4·d_model, RoPE, no "
            "biases, shared embeddings, vocabulary 256k, z-loss 1e-4. The lecture's table "
            "prints head_dim 258 and ratio 1.48; the paper says 256, so the ratio is "
            "48·256/18432 = 0.67, used here. PaLM runs attention and FFN in parallel in each "
            "block; this decoder runs them one after the other (same parameter count).",
            source="Chowdhery et al. 2022, PaLM: Scaling Language Modeling with Pathways, table 1",
            published_params=540e9,
            common=dict(
                ffn="swiglu", norm="layer", pos="rope", bias=False, tie_embeddings=True,
                z_loss=1e-4,
            ),
            full=dict(
                vocab_size=256000, n_layers=118, d_model=18432, n_heads=48, head_dim=256,
                n_kv_heads=1, d_ff=73728, max_seq_len=2048,
            ),
            small=dict(_SMALL, d_model=192, n_heads=4, head_dim=32, n_kv_heads=1, d_ff=768),
        ),
        Preset(
            name="llama2",
            doc="LLaMA 2 70B (Touvron et al. 2023): 80 layers, d_model 8192, 64 heads of 128 "
            "with 8 key/value heads (grouped-query), SwiGLU with d_ff 28672 (3.5·d_model), "
            "pre-RMSNorm, RoPE, untied embeddings, no biases. The small size keeps grouped-"
            "query attention with 2 key/value heads for 4 query heads.",
            source="Touvron et al. 2023, Llama 2: Open Foundation and Fine-Tuned Chat Models",
            published_params=70e9,
            common=dict(ffn="swiglu", norm="rms", pos="rope", bias=False, tie_embeddings=False),
            full=dict(
                vocab_size=32000, n_layers=80, d_model=8192, n_heads=64, head_dim=128,
                n_kv_heads=8, d_ff=28672, max_seq_len=4096,
            ),
            small=dict(_SMALL, d_model=128, n_heads=4, head_dim=32, n_kv_heads=2, d_ff=448),
        ),
    )
}  # fmt: skip


def get_preset(name: str, full: bool = False, **overrides: Any) -> DecoderConfig:
    """The preset's config, published (``full``) or small, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}.")
    preset = PRESETS[name]
    size = preset.full if full else preset.small
    return DecoderConfig.from_dict({**preset.common, **size, **overrides})


def preset_params(config: DecoderConfig) -> int:
    """Parameter count of the decoder built on the meta device: no memory, no init cost."""
    with torch.device("meta"):
        return Decoder(config).num_params()


def preset_row(name: str, full: bool = False) -> dict[str, Any]:
    """One row of `logitwatch presets`: the shape, its ratios and the parameter count."""
    cfg = get_preset(name, full=full)
    return {
        "name": name,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "ffn": cfg.ffn,
        "vocab_size": cfg.vocab_size,
        "head_ratio": cfg.n_heads * cfg.head_dim / cfg.d_model,
        "ff_ratio": cfg.d_ff / cfg.d_model,
        "aspect": cfg.d_model / cfg.n_layers,
        "params": preset_params(cfg),
        "published_params": PRESETS[name].published_params if full else None,
    }
