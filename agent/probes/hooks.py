"""Where probes attach to a model (``Sites``) and the hooks that feed them (``ProbeSet``).

A hook does nothing but test a flag unless the coming step is a reporting step; its body is
guarded so that a failing probe is logged once, switched off, and never raises into training.
"""

from __future__ import annotations

import logging
import sys
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
from logitwatch.agent.transport.sink import SeriesKey, series_key

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


def _in_backward() -> bool:
    """True while autograd's engine runs a backward on this thread: that is where activation
    checkpointing recomputes a block's forward, and with it fires the block's forward hooks."""
    task = getattr(torch._C, "_current_graph_task_id", None)  # private; absent: assume not
    return task is not None and task() != -1


def _compile_sees_hooks() -> None:
    """Make torch.compile guard on module hooks, once it is in use.

    By default (``skip_nnmodule_hook_guards``) dynamo does not: a graph compiled before the
    probes were installed, or for another instance of the same model class, would be reused
    without them (no attention, logits or act readings), and one compiled with them would keep
    running them after close(). With the guard, installing or removing the probes costs one
    recompile, and a model without hooks keeps its own graph. torch._dynamo is only touched
    when something imported it (torch.compile does): importing it costs about a second.
    """
    dynamo = sys.modules.get("torch._dynamo")
    config = getattr(dynamo, "config", None)
    if config is not None and getattr(config, "skip_nnmodule_hook_guards", False):
        config.skip_nnmodule_hook_guards = False


def _without_autocast(fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)`` with autocast off. Probes run inside the model's forward, so under its
    bf16/fp16 autocast their own matmuls would be cast down and every logit they compare
    rounded to 8 bits (measured: the attention maximum 0.2 % off on the CPU, where the probe
    means to be exact); each probe chooses its precision itself (``_matmul_dtype``)."""
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                _without_autocast(fn, *args)
            return
    fn(*args)


class ProbeSet:
    """Installs the hooks of ``sites`` and hands their reductions to ``slots``.

    ``armed`` is set by the Monitor before a reporting step's forward; hooks return at once
    otherwise, and also during forwards without grad (evaluation, generation).

    A hook only computes: its small result tensor waits in ``pending`` and is written into
    ``slots`` when the Monitor takes them, which keeps hook bodies traceable by torch.compile
    (no Python state read back, no allocation on the first write) — see ``drain``.

    One reading per site and step: a second call of a site *inside backward* — activation
    checkpointing recomputing the forward (``checkpoint(..., use_reentrant=False)``) — is
    ignored, so recomputation neither doubles the cost nor replaces a reading. The reentrant
    variant runs the forward without grad, so there the recompute in backward gives the
    (identical) reading. Repeated forwards (micro-batches) overwrite: the last one is reported.
    """

    def __init__(self, sites: Sites, slots: Slots, cfg: Any, label: dict[str, str]) -> None:
        self.sites, self.slots, self.cfg, self.label = sites, slots, cfg, label
        self.armed = False
        self.disabled: set[str] = set()
        # (kind, layer) -> the reduction's values, until the next drain. Cleared, never
        # replaced: a compiled graph may go on writing into the dict it was traced with
        # (measured: a replaced dict loses readings).
        self.pending: dict[tuple[str, int | None], torch.Tensor] = {}
        self._removers: list[Callable[[], None]] = []
        self._keys: dict[tuple[str, int | None, int], tuple[SeriesKey, ...]] = {}
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
        self._hooked = bool(self._removers)  # some model probe should fire when armed
        self._told_silent = False
        _compile_sees_hooks()
        slots.before_take.append(self.drain)
        self._removers.append(lambda: slots.before_take.remove(self.drain))

    def close(self) -> None:
        self.armed = False  # a compiled graph that still holds the hooks runs them idle
        for remove in reversed(self._removers):
            try:
                remove()
            except Exception:
                log.warning("logitwatch: could not remove a probe hook", exc_info=True)
        self._removers = []

    def live(self) -> bool:
        return self.armed and torch.is_grad_enabled()

    def fresh(self, name: tuple[str, int | None]) -> bool:
        """False for a repeated reading of ``name`` inside backward (checkpoint recompute).

        Under torch.compile the answer is always True and costs no guard: a compiled region's
        hooks run once, at trace time, into the forward graph, and its recompute is in the
        compiled backward graph, which has no hooks.
        """
        if torch.compiler.is_compiling():
            return True
        return name not in self.pending or not _in_backward()

    def guard(self, kind: str, fn: Callable[..., None], *args: Any) -> None:
        """Run one probe body; on error log once, switch the probe kind off, carry on."""
        if kind in self.disabled:
            return
        try:
            with torch.no_grad():
                _without_autocast(fn, *args)
        except Exception as e:
            self.disabled.add(kind)
            log.warning(
                "logitwatch: probe %r failed and is now off (%s: %s)", kind, type(e).__name__, e
            )

    def drain(self) -> None:
        """Write the pending reductions into the slots, with their series keys (``Slots.take``
        calls this; eager, after the step, so the keys cost nothing inside a compiled graph)."""
        # torch.compile is the likely cause of a silent step, so it is the only case we name.
        compiled = "torch._dynamo" in sys.modules
        if not self.pending and self._hooked and compiled and not self._told_silent:
            self._told_silent = True
            log.warning(
                "logitwatch: no model probe fired on a reporting step; under torch.compile "
                "create the Monitor (and attach) before the model's first compiled forward, "
                "or call torch._dynamo.reset() after creating it"
            )
        for (kind, layer), values in list(self.pending.items()):
            self.guard(kind, self._write, kind, layer, values)
        self.pending.clear()

    def _write(self, kind: str, layer: int | None, values: torch.Tensor) -> None:
        n_heads = values.numel() - len(ATTN_FIELDS)
        if kind == "attn" and not self.cfg.per_head:
            values = torch.cat([values[:n_heads].amax().reshape(1), values[n_heads:]])
        # The same keys every step: made once (dozens of series_key calls a step otherwise).
        keys = self._keys.get((kind, layer, n_heads))
        if keys is None:
            keys = self._keys[(kind, layer, n_heads)] = self._make_keys(kind, layer, n_heads)
        self.slots.write(kind if layer is None else (kind, layer), keys, values)

    def _make_keys(self, kind: str, layer: int | None, n_heads: int) -> tuple[SeriesKey, ...]:
        label = self.label
        if kind == "attn":
            if self.cfg.per_head:
                keys = [
                    series_key("attn.logit_max", layer=layer, head=h, **label)
                    for h in range(n_heads)
                ]
            else:
                keys = [series_key("attn.logit_max", layer=layer, **label)]
            keys += [series_key(name, layer=layer, **label) for name in ATTN_FIELDS]
        elif kind == "logits":
            keys = [series_key(n, **label) for n in LOGITS_FIELDS]
        else:
            keys = [series_key("act.rms", layer=layer, **label)]
        return tuple(keys)

    # -- probe bodies: reductions into ``pending``, nothing else ------------------------------

    def on_qk(self, layer: int, qk: QK) -> None:
        if self.live() and self.fresh(("attn", layer)):
            self.guard("attn", self._attn, layer, qk)

    def _attn(self, layer: int, qk: QK) -> None:
        cfg = self.cfg
        self.pending[("attn", layer)] = attn_stats(
            qk.q.detach(),
            qk.k.detach(),
            qk.scale,
            sample_rows=cfg.sample_rows,
            sample_batch=cfg.sample_batch,
            causal=qk.causal,
            mask=qk.mask,
            chunk_elems=getattr(cfg, "attn_chunk", None),
        )

    def on_logits(self, logits: torch.Tensor) -> None:
        if self.live() and self.fresh(("logits", None)):
            self.guard("logits", self._logits, logits)

    def _logits(self, logits: torch.Tensor) -> None:
        self.pending[("logits", None)] = logits_stats(logits, sample_tokens=self.cfg.sample_tokens)

    def on_resid(self, layer: int, x: torch.Tensor) -> None:
        if self.live() and self.fresh(("act", layer)):
            self.guard("act", self._resid, layer, x)

    def _resid(self, layer: int, x: torch.Tensor) -> None:
        self.pending[("act", layer)] = act_rms(x)

    # -- hook adapters ------------------------------------------------------------------------

    def _qk_hook(self, site: QKSite) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.live() and self.fresh(("attn", site.layer)):
                self.guard("attn", self._qk_call, site, module, args, kwargs, output)

        return hook

    def _qk_call(
        self, site: QKSite, module: nn.Module, args: tuple, kwargs: dict, out: Any
    ) -> None:
        self._attn(site.layer, site.get(module, args, kwargs, out))

    def _logits_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.live() and self.fresh(("logits", None)):
            self.guard("logits", self._logits_call, output)

    def _logits_call(self, output: Any) -> None:
        self._logits(self.sites.logits_get(output))  # the getter is guarded too

    def _resid_hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.live() and self.fresh(("act", layer)):
                self.guard("act", self._resid_call, layer, output)

        return hook

    def _resid_call(self, layer: int, output: Any) -> None:
        self._resid(layer, self.sites.resid_get(output))
