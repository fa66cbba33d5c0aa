"""Hugging Face transformers: the probe sites of a causal LM, on its attention functions.

transformers (v4.48+, v5) routes every attention call through ``ALL_ATTENTION_FUNCTIONS``
with the attention module, q (B, H, T, hs) after RoPE and k (B, Hkv, T, hs) before repeat_kv:
wrapping the entry the model uses gives the probes exactly what the dot product sees.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from logitwatch.agent.probes.hooks import QK, ProbeSet, Sites

__all__ = ["attention_modules", "hf_sites"]

#: id(attention module) -> (ProbeSet, layer) for the modules some Monitor watches.
_watched: dict[int, tuple[ProbeSet, int]] = {}
#: implementation name -> (previous local entry or None, number of installs).
_patched: dict[str, tuple[Any, int]] = {}


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules, in layer order (they carry ``layer_idx``)."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
    ]
    return sorted(found, key=lambda nm: nm[1].layer_idx)


def hf_sites(model: PreTrainedModel) -> Sites:
    """Probe sites of a transformers causal LM: attention calls, lm_head, decoder layers."""
    sites = Sites(logits=model.get_output_embeddings())
    modules = dict(model.named_modules())
    attn = attention_modules(model)
    for name, m in attn:
        parent = name.rpartition(".")[0]
        sites.layer_prefixes[parent] = m.layer_idx
        if parent in modules:
            sites.resid.append((m.layer_idx, modules[parent]))
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    sites.installers.append(lambda probes: _install(probes, attn, impl))
    return sites


def _install(probes: ProbeSet, attn: list[tuple[str, nn.Module]], impl: str) -> Callable[[], None]:
    if impl == "eager":
        for _, m in attn:
            _eager_of(m)  # fail here (probe off) rather than inside the model's forward
    for _, m in attn:
        _watched[id(m)] = (probes, m.layer_idx)
    previous, count = _patched.get(impl, (None, 0))
    if count == 0:
        previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
        original = ALL_ATTENTION_FUNCTIONS.get(impl)  # None for "eager": no registered entry
        ALL_ATTENTION_FUNCTIONS[impl] = _wrap(original)
    _patched[impl] = (previous, count + 1)

    def remove() -> None:
        for _, m in attn:
            if _watched.get(id(m), (None,))[0] is probes:
                del _watched[id(m)]
        prev, n = _patched.pop(impl, (None, 1))
        if n > 1:
            _patched[impl] = (prev, n - 1)
        elif prev is not None:
            ALL_ATTENTION_FUNCTIONS[impl] = prev
        else:
            ALL_ATTENTION_FUNCTIONS._local_mapping.pop(impl, None)

    return remove


def _eager_of(module: nn.Module) -> Callable:
    """The model file's own eager attention (what transformers uses when none is registered)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward to wrap")
    return fn


def _wrap(original: Callable | None) -> Callable:
    def logitwatch_attention(module, query, key, value, attention_mask, *args, **kwargs):
        entry = _watched.get(id(module))
        if entry is not None and entry[0].live():
            probes, layer = entry
            scale = kwargs.get("scaling") or getattr(module, "scaling", None)
            mask = attention_mask
            if not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
                mask = None  # None: causal only; other layouts (packed) are not read
            qk = QK(
                query,
                key,
                float(scale) if scale else query.size(-1) ** -0.5,
                bool(getattr(module, "is_causal", True)),
                mask,
            )
            probes.on_qk(layer, qk)
        fn = original if original is not None else _eager_of(module)
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    return logitwatch_attention
