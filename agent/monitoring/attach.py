"""Tell the Monitor where the attention, q/k, logits and blocks of a model are.

The reference decoder and Hugging Face models are found automatically; ``attach`` covers a
user's own ``nn.Module`` decoder.
"""

from __future__ import annotations

import fnmatch
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from logitwatch.agent.probes.hooks import QK, QKSite, Sites

__all__ = ["attach", "discover", "hookpoint_sites"]

log = logging.getLogger("logitwatch.agent")

Selector = str | Sequence[str] | type | Callable[[str, nn.Module], bool]


def attach(
    target: Any,
    *,
    attention: Selector,
    qk: str | Callable[[nn.Module, tuple, Any], tuple[torch.Tensor, torch.Tensor]],
    logits: str | None = None,
    blocks: Selector | None = None,
    scale: float | None = None,
    causal: bool = True,
) -> Sites:
    """Describe a user's decoder to the probes; with a Monitor as ``target``, install them.

    - ``attention``: which modules are attention layers, in layer order: a glob over module
      names (``"layers.*.attn"``), a list of names, a class, or ``fn(name, module) -> bool``.
    - ``qk``: how to read q (B, n_heads, T, hs) and k (B, n_kv_heads, T, hs) after any QK-norm
      and RoPE, before scaling: the name of a child of each attention module that is called as
      ``child(q, k)`` (an identity hook point), or ``fn(attn_module, args, output) -> (q, k)``
      that recomputes them from the attention module's call (runs on reporting steps only).
    - ``logits``: name of the module whose output is the logits before any soft-capping.
    - ``blocks``: the residual blocks, whose outputs give ``act.rms`` and whose parameters
      make a layer's grad/param/update norms; default: the parent of each attention module.
    - ``scale``: multiplies q·k; default ``module.scale``/``module.scaling`` or 1/sqrt(hs).

    >>> import torch
    >>> from torch import nn
    >>> from logitwatch.agent import Monitor, attach
    >>> from logitwatch.agent.transport.sink import MemorySink
    >>> class Attn(nn.Module):
    ...     def __init__(self, d=16, h=2):
    ...         super().__init__()
    ...         self.h, self.qkv, self.out = h, nn.Linear(d, 3 * d), nn.Linear(d, d)
    ...     def split(self, x):  # (B, T, d) -> q, k, v each (B, h, T, d/h)
    ...         B, T, d = x.shape
    ...         return [t.view(B, T, self.h, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1)]
    ...     def forward(self, x):
    ...         q, k, v = self.split(x)
    ...         y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ...         return self.out(y.transpose(1, 2).flatten(2))
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = Attn()
    ...     def forward(self, x):
    ...         return x + self.attn(x)
    >>> class LM(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb, self.layers = nn.Embedding(32, 16), nn.ModuleList([Block(), Block()])
    ...         self.head = nn.Linear(16, 32)
    ...     def forward(self, idx):
    ...         x = self.emb(idx)
    ...         for block in self.layers:
    ...             x = block(x)
    ...         return self.head(x)
    >>> model, sink = LM(), MemorySink()
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> with Monitor(model, opt, run="demo", sink=sink) as monitor:
    ...     _ = attach(monitor, attention="layers.*.attn", logits="head",
    ...                qk=lambda attn, args, out: attn.split(args[0])[:2])
    ...     for step in range(3):
    ...         idx = torch.randint(0, 32, (2, 8))
    ...         loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    ...         loss.backward(); opt.step(); opt.zero_grad()
    ...         monitor.step(step, loss=loss, tokens=idx.numel())
    >>> sorted(k[0] for k in sink.keys() if k[0].startswith("attn."))[:2]
    ['attn.entropy_frac', 'attn.entropy_frac']
    >>> len(sink.series("attn.logit_max", layer=1, head=0)[0])
    3
    """
    model = target.model if hasattr(target, "use_sites") else target
    named = _select(model, attention)
    if not named:
        raise ValueError(f"attention: no module of the model matches {attention!r}.")
    sites = Sites()
    for layer, (name, module) in enumerate(named):
        sites.qk.append(QKSite(layer, *_qk_reader(module, qk, scale, causal)))
        sites.layer_prefixes[name.rpartition(".")[0] or name] = layer
    if blocks is not None:
        found = _select(model, blocks)
        if len(found) != len(named):
            raise ValueError(
                f"blocks: matched {len(found)} modules for {len(named)} attention layers."
            )
        sites.layer_prefixes = {name: i for i, (name, _) in enumerate(found)}
    modules = dict(model.named_modules())
    for prefix, layer in sites.layer_prefixes.items():
        if prefix in modules:
            sites.resid.append((layer, modules[prefix]))
    if logits is not None:
        if logits not in modules:
            raise ValueError(f"logits: the model has no module named {logits!r}.")
        sites.logits = modules[logits]
    if hasattr(target, "use_sites"):
        target.use_sites(sites)
    return sites


def _select(model: nn.Module, selector: Selector) -> list[tuple[str, nn.Module]]:
    if isinstance(selector, str):
        pattern = selector

        def match(n: str, m: nn.Module) -> bool:
            return fnmatch.fnmatchcase(n, pattern)

    elif isinstance(selector, type):
        cls = selector

        def match(n: str, m: nn.Module) -> bool:
            return isinstance(m, cls)

    elif callable(selector):
        match = selector
    else:
        names = list(selector)
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"the model has no module named {missing[0]!r}.")
        return [(n, modules[n]) for n in names]
    return [(n, m) for n, m in model.named_modules() if n and match(n, m)]


def _default_scale(module: nn.Module, q: torch.Tensor) -> float:
    for attr in ("scale", "scaling"):
        value = getattr(module, attr, None)
        if isinstance(value, int | float):
            return float(value)
    return q.size(-1) ** -0.5


def _qk_reader(module: nn.Module, qk: Any, scale: float | None, causal: bool):
    if isinstance(qk, str):
        child = dict(module.named_modules()).get(qk)
        if child is None:
            raise ValueError(f"qk: the attention module has no child named {qk!r}.")

        def from_child(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> QK:
            s = scale if scale is not None else _default_scale(module, args[0])
            return QK(args[0], args[1], s, causal)

        return child, from_child
    if not callable(qk):
        raise ValueError(
            "qk must be a child module name or a callable (module, args, output) -> (q, k)."
        )

    def from_call(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> QK:
        q, k = qk(m, args, out)
        return QK(q, k, scale if scale is not None else _default_scale(m, q), causal)

    return module, from_call


def hookpoint_sites(model: nn.Module) -> Sites | None:
    """Sites of a model built with ``HookPoint``s (the reference decoder), or None."""
    sites = Sites()
    for name, m in model.named_modules():
        kind = getattr(m, "kind", None) if type(m).__name__ == "HookPoint" else None
        if kind == "qk":
            sites.qk.append(QKSite(m.layer, m, _hookpoint_qk))
        elif kind == "logits":
            sites.logits = m
        elif kind == "resid":
            sites.resid.append((m.layer, m))
            sites.layer_prefixes[name.rpartition(".")[0]] = m.layer
    return sites if sites.qk or sites.logits is not None or sites.resid else None


def _hookpoint_qk(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> QK:
    return QK(args[0], args[1], float(m.scale), bool(getattr(m, "causal", True)))


def discover(model: nn.Module) -> Sites:
    """Find the probe sites of a known model family; empty Sites (and a note) otherwise."""
    sites = hookpoint_sites(model)
    if sites is not None:
        return sites
    if "transformers" in sys.modules:  # never import transformers just to find out
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            from logitwatch.agent.probes.hf import hf_sites

            return hf_sites(model)
    log.info(
        "logitwatch: no known probe sites in %s; attention/logit probes need attach()",
        type(model).__name__,
    )
    return Sites()
