"""Where probes attach to a model (``Sites``) and the hooks that feed them (``ProbeSet``).

A hook does nothing but test a flag unless the coming step is a reporting step; its body is
guarded so that a failing probe is logged once, switched off, and never raises into training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from logitwatch.agent.probes.reductions import (
    ATTN_FIELDS,
    LOGITS_FIELDS,
    Slots,
    act_rms,
    attn_stats,
    logits_stats,
)
from logitwatch.agent.transport.sink import series_key

__all__ = ["QK", "ProbeSet", "QKSite", "Sites"]

log = logging.getLogger("logitwatch.agent")


@dataclass
class QK:
    """What the attention probe needs from one attention call."""

    q: torch.Tensor  # (B, n_heads, Tq, hs) after norms and RoPE, before scaling
    k: torch.Tensor  # (B, n_kv_heads, Tk, hs)
    scale: float
    causal: bool = True
    mask: torch.Tensor | None = None  # bool "may attend" or additive float, (B|1, 1|H, Tq, Tk)


#: Reads the QK of one call from a forward hook's (module, args, kwargs, output).
QKGetter = Callable[[nn.Module, tuple, dict, Any], QK]


@dataclass
class QKSite:
    layer: int
    module: nn.Module
    get: QKGetter


@dataclass
class Sites:
    """The places in one model where probes read tensors.

    ``installers`` cover what a forward hook cannot reach (transformers' attention functions):
    each takes the ProbeSet and returns a function that uninstalls it.
    """

    qk: list[QKSite] = field(default_factory=list)
    logits: nn.Module | None = None
    logits_get: Callable[[Any], torch.Tensor] = lambda out: out
    resid: list[tuple[int, nn.Module]] = field(default_factory=list)
    resid_get: Callable[[Any], torch.Tensor] = lambda out: out[0] if isinstance(out, tuple) else out
    layer_prefixes: dict[str, int] = field(default_factory=dict)  # parameter-name prefix -> layer
    installers: list[Callable[[ProbeSet], Callable[[], None]]] = field(default_factory=list)


class ProbeSet:
    """Installs the hooks of ``sites`` and writes their reductions into ``slots``.

    ``armed`` is set by the Monitor before a reporting step's forward; hooks return at once
    otherwise, and also during forwards without grad (evaluation, generation).
    """

    def __init__(self, sites: Sites, slots: Slots, cfg: Any, label: dict[str, str]) -> None:
        self.sites, self.slots, self.cfg, self.label = sites, slots, cfg, label
        self.armed = False
        self.disabled: set[str] = set()
        self._removers: list[Callable[[], None]] = []
        on = set(cfg.probes)
        if "attn" in on:
            for site in sites.qk:
                h = site.module.register_forward_hook(self._qk_hook(site), with_kwargs=True)
                self._removers.append(h.remove)
            for install in sites.installers:
                try:
                    self._removers.append(install(self))
                except Exception as e:  # a model we cannot probe still trains
                    self.disabled.add("attn")
                    log.warning(
                        "logitwatch: attention probes are off (%s: %s)", type(e).__name__, e
                    )
        if "logits" in on and sites.logits is not None:
            h = sites.logits.register_forward_hook(self._logits_hook)
            self._removers.append(h.remove)
        if "act" in on:
            for layer, module in sites.resid:
                h = module.register_forward_hook(self._resid_hook(layer))
                self._removers.append(h.remove)

    def close(self) -> None:
        for remove in reversed(self._removers):
            try:
                remove()
            except Exception:
                log.warning("logitwatch: could not remove a probe hook", exc_info=True)
        self._removers = []

    def live(self) -> bool:
        return self.armed and torch.is_grad_enabled()

    def guard(self, kind: str, fn: Callable[..., None], *args: Any) -> None:
        """Run one probe body; on error log once, switch the probe kind off, carry on."""
        if kind in self.disabled:
            return
        try:
            with torch.no_grad():
                fn(*args)
        except Exception as e:
            self.disabled.add(kind)
            log.warning(
                "logitwatch: probe %r failed and is now off (%s: %s)", kind, type(e).__name__, e
            )

    # -- probe bodies -------------------------------------------------------------------------

    def on_qk(self, layer: int, qk: QK) -> None:
        if self.live():
            self.guard("attn", self._attn, layer, qk)

    def _attn(self, layer: int, qk: QK) -> None:
        cfg = self.cfg
        values = attn_stats(
            qk.q.detach(),
            qk.k.detach(),
            qk.scale,
            sample_rows=cfg.sample_rows,
            sample_batch=cfg.sample_batch,
            causal=qk.causal,
            mask=qk.mask,
        )
        n_heads = qk.q.size(1)
        if cfg.per_head:
            heads = [
                series_key("attn.logit_max", layer=layer, head=h, **self.label)
                for h in range(n_heads)
            ]
        else:
            values = torch.cat([values[:n_heads].amax().reshape(1), values[n_heads:]])
            heads = [series_key("attn.logit_max", layer=layer, **self.label)]
        keys = heads + [series_key(name, layer=layer, **self.label) for name in ATTN_FIELDS]
        self.slots.write(("attn", layer), keys, values)

    def on_logits(self, logits: torch.Tensor) -> None:
        if self.live():
            self.guard("logits", self._logits, logits)

    def _logits(self, logits: torch.Tensor) -> None:
        values = logits_stats(logits, sample_tokens=self.cfg.sample_tokens)
        self.slots.write("logits", [series_key(n, **self.label) for n in LOGITS_FIELDS], values)

    def on_resid(self, layer: int, x: torch.Tensor) -> None:
        if self.live():
            self.guard("act", self._resid, layer, x)

    def _resid(self, layer: int, x: torch.Tensor) -> None:
        self.slots.write(
            ("act", layer), [series_key("act.rms", layer=layer, **self.label)], act_rms(x)
        )

    # -- hook adapters ------------------------------------------------------------------------

    def _qk_hook(self, site: QKSite) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.live() and "attn" not in self.disabled:
                self.guard(
                    "attn", lambda: self._attn(site.layer, site.get(module, args, kwargs, output))
                )

        return hook

    def _logits_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.live():
            self.guard("logits", lambda: self._logits(self.sites.logits_get(output)))

    def _resid_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.live():
                self.guard("act", lambda: self._resid(layer, self.sites.resid_get(output)))

        return hook
