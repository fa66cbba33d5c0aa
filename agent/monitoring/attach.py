"""Tell the Monitor where the attention, q/k, logits and blocks of a model are.

The reference decoder, Hugging Face models and decoders with ``HookPoint("qk")`` children are
found automatically; ``attach`` covers any other ``nn.Module`` decoder.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from logitwatch.agent.probes.hooks import QK, QKSite, Sites

__all__ = ["attach", "discover", "hookpoint_sites"]

log = logging.getLogger("logitwatch.agent")

Selector = str | Sequence[str] | type | Callable[[str, nn.Module], bool]
QKFunction = Callable[[nn.Module, tuple, Any], tuple[torch.Tensor, torch.Tensor]]

#: Modules that hold layers but are never called themselves (or, for Sequential, whose output
#: is the whole stack's): a hook on one of them is never a single layer's.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)

_QK_SHAPES = (
    "q (batch, heads, tokens, head_dim) and k (batch, kv_heads, tokens, head_dim), with the same "
    "batch and head_dim and heads a multiple of kv_heads"
)


def attach(
    target: Any,
    *,
    attention: Selector | None = None,
    qk: str | QKFunction,
    logits: str | None = None,
    blocks: Selector | None = None,
    scale: float | None = None,
    causal: bool = True,
    example: Any = None,
) -> Sites:
    """Describe a user's decoder to the probes; with a Monitor as ``target``, install them.

    - ``attention``: one module per attention layer, in layer order: a glob over dotted module
      names, a list of names, a class, or ``fn(name, module) -> bool``. A glob matches ONE
      depth, as fnmatch does per dotted part: ``*`` never crosses a dot, so ``"blocks.*"``
      matches ``blocks.0`` and ``blocks.1`` but never ``blocks.0.n1``. When attention is
      written inline in a block's ``forward``, the block is the attention module
      (``attention="blocks.*"`` or ``attention=Block``). Default, with ``qk`` a name: every
      module that has a child of that name.
    - ``qk``: how to read q (B, n_heads, T, hs) and k (B, n_kv_heads, T, hs) after any QK-norm
      and RoPE, before scaling. Either the name of a child of each attention module that the
      forward calls as ``child(q, k)`` -- make it a ``logitwatch.agent.HookPoint("qk")``, an
      identity that takes any number of tensors (``nn.Identity`` takes one, so it cannot be) --
      or ``fn(attn_module, args, output) -> (q, k)`` that recomputes them from the attention
      module's call (runs on reporting steps only).
    - ``logits``: name of the module whose output is the logits before any soft-capping.
    - ``blocks``: the residual blocks, one per attention layer, whose outputs give ``act.rms``
      and whose parameters make a layer's grad/param/update norms. Default: the parent of each
      attention module; an attention module that sits directly in a ModuleList/Sequential is
      its own block. When neither tells, a warning says so and names what to pass.
    - ``scale``: multiplies q·k; default ``scale``/``scaling`` of the qk child or the attention
      module, else 1/sqrt(hs).
    - ``example``: an input of the model (a tensor, a tuple of arguments or a dict of keyword
      arguments); when given, attach runs the model once on it (no grad, eval mode, RNG state
      kept) and raises if a site is not called or ``qk`` does not give (q, k). Without it a
      ``qk`` function is first checked on the first reporting step, where a failure switches
      the attention probe off with a warning naming the module.

    Every other mistake (a selector that matches nothing or nested modules, a missing or
    ``nn.Identity`` qk child, a ``qk`` function of the wrong signature) raises ValueError here,
    naming the module and what was expected.

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
    ...                qk=lambda attn, args, out: attn.split(args[0])[:2],
    ...                example=torch.zeros(1, 4, dtype=torch.long))
    ...     for step in range(3):
    ...         idx = torch.randint(0, 32, (2, 8))
    ...         loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    ...         loss.backward(); opt.step(); opt.zero_grad()
    ...         monitor.step(step, loss=loss, tokens=idx.numel())
    >>> sorted(k[0] for k in sink.keys() if k[0].startswith("attn."))[:2]
    ['attn.entropy_frac', 'attn.entropy_frac']
    >>> len(sink.series("attn.logit_max", layer=1, head=0)[0])
    3
    >>> sink.series("act.rms", layer=1)[0]
    [0, 1, 2]
    """
    model = target.model if hasattr(target, "use_sites") else target
    modules = dict(model.named_modules())
    if attention is None:
        if not isinstance(qk, str):
            raise ValueError(
                "attention: needed when qk is a function; pass a glob such as 'layers.*.attn', "
                "a class, or a list of module names."
            )
        named = [(n, m) for n, m in model.named_modules() if n and f"{n}.{qk}" in modules]
        if not named:
            raise ValueError(
                f"qk: no module of {type(model).__name__} has a child named {qk!r}, so the "
                "attention modules cannot be found from it; pass attention= as well."
            )
        _one_per_layer(named, "attention", f"a child named {qk!r}")
    else:
        named = _select(model, attention, "attention")
    sites = Sites()
    for layer, (name, module) in enumerate(named):
        sites.qk.append(QKSite(layer, *_qk_reader(modules, name, module, qk, scale, causal)))
    if blocks is not None:
        found = _select(model, blocks, "blocks")
        if len(found) != len(named):
            raise ValueError(
                f"blocks: {_describe_selector(blocks)} matched {len(found)} modules ({_names(found)}) for "
                f"{len(named)} attention layers ({_names(named)}); pass one block per "
                "attention layer, in the same order."
            )
    else:
        found = _default_blocks(model, named)
    _add_blocks(sites, found)
    if logits is not None:
        if logits not in modules:
            raise ValueError(f"logits: {type(model).__name__} has no module named {logits!r}.")
        _not_container(logits, modules[logits], "logits")
        sites.logits = modules[logits]
    if example is not None:
        _trial(model, example, sites, {id(m): n for n, m in modules.items()})
    if hasattr(target, "use_sites"):
        target.use_sites(sites)
    return sites


# -- selecting modules ------------------------------------------------------------------------


def _named(name: str, module: nn.Module) -> str:
    return f"{name!r} ({type(module).__name__})"


def _names(named: list[tuple[str, nn.Module]], most: int = 4) -> str:
    shown = ", ".join(repr(n) for n, _ in named[:most])
    return shown + (", …" if len(named) > most else "") if named else "none"


def _glob(pattern: str) -> Callable[[str, nn.Module], bool]:
    """fnmatch per dotted part: a ``*`` matches within one part and never crosses a dot."""
    parts = pattern.split(".")

    def match(name: str, module: nn.Module) -> bool:
        segs = name.split(".")
        return len(segs) == len(parts) and all(
            fnmatch.fnmatchcase(s, p) for s, p in zip(segs, parts, strict=True)
        )

    return match


def _select(model: nn.Module, selector: Selector, field: str) -> list[tuple[str, nn.Module]]:
    """The modules ``selector`` picks, in the model's order; raises unless one per layer."""
    if isinstance(selector, str):
        match = _glob(selector)
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
            raise ValueError(f"{field}: {type(model).__name__} has no module named {missing[0]!r}.")
        found = [(n, modules[n]) for n in names]
        _one_per_layer(found, field, _describe_selector(selector))
        return found
    found = [(n, m) for n, m in model.named_modules() if n and match(n, m)]
    if not found:
        hint = ""
        if isinstance(selector, str):
            depth = selector.count(".")
            near = [(n, m) for n, m in model.named_modules() if n and n.count(".") == depth]
            hint = (
                f" (a '*' matches within one dotted part, never across a dot; modules at that"
                f" depth: {_names(near, 6)})"
            )
        raise ValueError(
            f"{field}: no module of {type(model).__name__} matches {_describe_selector(selector)}"
            f"{hint}."
        )
    _one_per_layer(found, field, _describe_selector(selector))
    return found


def _describe_selector(selector: Any) -> str:
    if isinstance(selector, type):
        return f"the class {selector.__name__}"
    if callable(selector):
        name = getattr(selector, "__name__", "<lambda>")
        return "the selector function" if name == "<lambda>" else f"the function {name}"
    return repr(selector)


def _one_per_layer(found: list[tuple[str, nn.Module]], field: str, selector: str) -> None:
    for name, module in found:
        _not_container(name, module, field)
    for outer, om in found:
        for inner, im in found:
            if inner.startswith(outer + "."):
                raise ValueError(
                    f"{field}: {_named(inner, im)} lies inside {_named(outer, om)} and both match "
                    f"{selector}; select exactly one module per layer."
                )


def _not_container(name: str, module: nn.Module, field: str) -> None:
    if isinstance(module, _CONTAINERS):
        raise ValueError(
            f"{field}: {_named(name, module)} is a container of layers, not one layer; select "
            f"the modules inside it (for example '{name}.*')."
        )


def _default_blocks(
    model: nn.Module, named: list[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module]] | None:
    """Each attention module's block, or None (with a warning) when the model does not tell."""
    modules = dict(model.named_modules())
    parents = [name.rpartition(".")[0] for name, _ in named]
    shared = Counter(parents)
    found = []
    for (name, module), parent in zip(named, parents, strict=True):
        owner = modules[parent]
        if isinstance(owner, _CONTAINERS):
            found.append((name, module))  # a layer of the stack: attention inline in the block
        elif parent and shared[parent] == 1:
            found.append((parent, owner))
        else:
            log.warning(
                "logitwatch: cannot tell the residual blocks of %s from its attention modules "
                "(%s): act.rms and per-layer grad/param/update norms are off. Pass attach(..., "
                "blocks=) a glob such as 'layers.*', a class, or a list of names: one module "
                "per attention layer whose output is the residual stream.",
                type(model).__name__,
                _names(named),
            )
            return None
    return found


def _add_blocks(sites: Sites, found: list[tuple[str, nn.Module]] | None) -> None:
    for layer, (name, module) in enumerate(found or []):
        sites.resid.append((layer, module))
        sites.layer_prefixes[name] = layer


# -- reading q and k ----------------------------------------------------------------------------


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def _check_qk(q: Any, k: Any, where: str) -> None:
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise ValueError(
            f"qk: {where} gave {_describe(q)} and {_describe(k)}; expected {_QK_SHAPES}."
        )
    if not (
        q.dim() == 4
        and k.dim() == 4
        and q.size(0) == k.size(0)
        and q.size(-1) == k.size(-1)
        and k.size(1) > 0
        and q.size(1) % k.size(1) == 0
    ):
        raise ValueError(
            f"qk: {where} gave q {tuple(q.shape)} and k {tuple(k.shape)}; expected {_QK_SHAPES}."
        )


def _default_scale(modules: Sequence[nn.Module], q: torch.Tensor) -> float:
    for module in modules:
        for attr in ("scale", "scaling"):
            value = getattr(module, attr, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
    return q.size(-1) ** -0.5


def _takes(fn: Callable, n: int) -> bool:
    """Whether ``fn`` can be called with n positional arguments (True when it cannot be told)."""
    try:
        inspect.signature(fn).bind(*([None] * n))
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin)
        return True
    return True


def _qk_reader(
    modules: dict[str, nn.Module],
    name: str,
    module: nn.Module,
    qk: Any,
    scale: float | None,
    causal: bool,
):
    if isinstance(qk, str):
        child = modules.get(f"{name}.{qk}")
        if child is None:
            children = [n for n, _ in module.named_children()]
            raise ValueError(
                f"qk: the attention module {_named(name, module)} has no child named {qk!r} "
                f"(its children: {', '.join(map(repr, children)) or 'none'})."
            )
        return child, _child_reader(f"{name}.{qk}", child, module, scale, causal)
    if not callable(qk):
        raise ValueError(
            f"qk: expected the name of a child module or a function (attn_module, args, output)"
            f" -> (q, k); got {_describe(qk)}."
        )
    if not _takes(qk, 3):
        raise ValueError(
            f"qk: the function {getattr(qk, '__name__', qk)!r} must take (attn_module, args, "
            "output); it cannot be called with three arguments."
        )
    where = f"the function on {_named(name, module)}"

    def from_call(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> QK:
        try:
            pair = qk(m, args, out)
        except Exception as e:
            raise ValueError(f"qk: {where} failed ({type(e).__name__}: {e}).") from e
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"qk: {where} returned {_describe(pair)}; expected a pair (q, k).")
        q, k = pair
        _check_qk(q, k, where)
        s = scale if scale is not None else _default_scale([m], q)
        return QK(q, k, s, causal)

    return module, from_call


def _child_reader(
    name: str, child: nn.Module, owner: nn.Module, scale: float | None, causal: bool
) -> Callable[[nn.Module, tuple, dict, Any], QK]:
    if isinstance(child, nn.Identity):
        raise ValueError(
            f"qk: {_named(name, child)} is an nn.Identity, which takes one input, but the qk "
            "hook point is called as child(q, k); make it a logitwatch.agent.HookPoint('qk'), "
            "an identity that takes any number of tensors."
        )
    if not _takes(child.forward, 2):
        raise ValueError(
            f"qk: {_named(name, child)} cannot be called as child(q, k): its forward takes "
            f"{inspect.signature(child.forward)}; make it a logitwatch.agent.HookPoint('qk')."
        )
    where = f"{_named(name, child)}, called as child(q, k),"

    def from_child(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> QK:
        if len(args) < 2:
            raise ValueError(f"qk: {where} got {len(args)} tensor(s); expected child(q, k).")
        q, k = args[0], args[1]
        _check_qk(q, k, where)
        s = scale if scale is not None else _default_scale([child, owner], q)
        return QK(q, k, s, bool(getattr(child, "causal", causal)))

    return from_child


# -- a trial forward ----------------------------------------------------------------------------


def _trial(model: nn.Module, example: Any, sites: Sites, names: dict[int, str]) -> None:
    """Run the model once on ``example`` and raise if a site is not called or reads wrong."""
    errors: list[str] = []
    calls: Counter[int] = Counter()

    def named(m: nn.Module) -> str:
        return _named(names.get(id(m), "?"), m)

    def tensor_out(field: str, get: Callable[[Any], Any]) -> Callable:
        def check(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            value = get(out)
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"{field}: {named(m)} returned {_describe(value)}; expected a tensor "
                    "(or a tuple whose first element is one)."
                )

        return check

    watched = [("qk", s.module, s.get) for s in sites.qk]
    watched += [("blocks", m, tensor_out("blocks", sites.resid_get)) for _, m in sites.resid]
    if sites.logits is not None:
        watched.append(("logits", sites.logits, tensor_out("logits", sites.logits_get)))

    def hook_for(check: Callable) -> Callable:
        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            calls[id(m)] += 1
            if not errors:
                try:
                    check(m, args, kwargs, out)
                except ValueError as e:
                    errors.append(str(e))
                except Exception as e:
                    errors.append(f"{named(m)} could not be read ({type(e).__name__}: {e}).")

        return hook

    handles = [m.register_forward_hook(hook_for(c), with_kwargs=True) for _, m, c in watched]
    training = [(m, m.training) for m in model.modules()]
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        model.eval()  # no dropout, no running-statistics update: the trial leaves no trace
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            if isinstance(example, dict):
                model(**example)
            elif isinstance(example, tuple):
                model(*example)
            else:
                model(example)
    except Exception as e:
        raise ValueError(
            f"example: {type(model).__name__} failed on the example ({type(e).__name__}: {e}); "
            "pass an input its forward accepts (a tensor, a tuple of arguments or a dict)."
        ) from e
    finally:
        for h in handles:
            h.remove()
        for m, was in training:
            m.training = was
    if errors:
        raise ValueError(errors[0])
    for field, m, _ in watched:
        if not calls[id(m)]:
            raise ValueError(
                f"{field}: {named(m)} was not called when the model ran on the example, so no "
                "probe on it would ever see a tensor; select a module the forward calls."
            )


# -- automatic discovery ------------------------------------------------------------------------


def hookpoint_sites(model: nn.Module) -> Sites | None:
    """Sites of a model built with ``HookPoint``s (the reference decoder, or a user's), or None.

    A user's ``HookPoint("qk")`` needs no ``layer`` or ``scale``: layers are counted in model
    order, the scale defaults as in ``attach``, and without ``HookPoint("resid")`` points the
    blocks are found as ``attach`` finds them.
    """
    points: dict[str, list[tuple[str, nn.Module]]] = {"qk": [], "logits": [], "resid": []}
    for name, m in model.named_modules():
        kind = getattr(m, "kind", None) if type(m).__name__ == "HookPoint" else None
        if kind in points:
            points[kind].append((name, m))
    if not any(points.values()):
        return None
    modules = dict(model.named_modules())
    sites = Sites()
    for i, (name, m) in enumerate(points["qk"]):
        owner = modules[name.rpartition(".")[0]]
        sites.qk.append(QKSite(_layer(m, i), m, _hookpoint_reader(name, m, owner)))
    if points["logits"]:
        sites.logits = points["logits"][-1][1]
    if points["resid"]:
        for i, (name, m) in enumerate(points["resid"]):
            sites.resid.append((_layer(m, i), m))
            sites.layer_prefixes[name.rpartition(".")[0]] = _layer(m, i)
    elif points["qk"]:
        owners = [n.rpartition(".")[0] for n, _ in points["qk"]]
        _add_blocks(sites, _default_blocks(model, [(n, modules[n]) for n in owners]))
    return sites


def _layer(m: nn.Module, index: int) -> int:
    layer = getattr(m, "layer", None)
    return layer if isinstance(layer, int) and not isinstance(layer, bool) else index


def _hookpoint_reader(name: str, m: nn.Module, owner: nn.Module):
    where = f"{_named(name, m)}, called as child(q, k),"

    def get(hp: nn.Module, args: tuple, kwargs: dict, out: Any) -> QK:
        if len(args) < 2:
            raise ValueError(f"qk: {where} got {len(args)} tensor(s); expected child(q, k).")
        _check_qk(args[0], args[1], where)
        s = _default_scale([hp, owner], args[0])
        return QK(args[0], args[1], s, bool(getattr(hp, "causal", True)))

    return get


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
