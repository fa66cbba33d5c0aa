"""AdamW as the lecture sets it up: decay on matrices only, betas (0.9, 0.95), clipping in step().

Clipping happens inside ``step()`` rather than in the training loop, so that an optimizer step
pre-hook (the Monitor's) sees the gradient before it is clipped: a clipped norm hides a spike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["ClippedAdamW", "build_optimizer", "split_decay"]

_MATRIX_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Bilinear)
_NORM_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the global gradient norm at the start of ``step()``.

    >>> p = nn.Parameter(torch.zeros(3))
    >>> opt = ClippedAdamW([p], lr=0.1, clip_grad_norm=1.0)
    >>> p.grad = torch.tensor([3.0, 4.0, 0.0])
    >>> opt.step()
    >>> float(opt.last_grad_norm), round(float(p.grad.norm()), 4)
    (5.0, 1.0)
    """

    def __init__(self, params: Any, *, clip_grad_norm: float | None = 1.0, **kwargs: Any) -> None:
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None (off), got {clip_grad_norm!r}")
        super().__init__(params, **kwargs)
        #: Max global L2 norm of the gradients; None switches clipping off.
        self.clip_grad_norm = clip_grad_norm
        #: Global gradient norm before clipping, of the last step (a device tensor, no sync).
        self.last_grad_norm: torch.Tensor | None = None
        #: Each parameter's gradient norm before clipping, of the last step (id(param) -> a
        #: 0-d device tensor), when the gradients are plain tensors on one device; else None.
        #: A Monitor reads these instead of reading every gradient again (saves a pass over
        #: all gradients on a reporting step).
        self.last_grad_norms: dict[int, torch.Tensor] | None = None

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.last_grad_norms = None
        if params:
            grads = [p.grad for p in params]
            if _plain(grads):  # the per-tensor norms get_total_norm takes, kept
                per = torch._foreach_norm(grads)
                norm = torch.linalg.vector_norm(torch.stack(per))
                self.last_grad_norms = {id(p): n for p, n in zip(params, per, strict=True)}
            else:  # DTensors (FSDP2), mixed devices or dtypes: torch groups and reduces them
                norm = torch.nn.utils.get_total_norm(grads)
            if self.clip_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad_norm, norm)
            self.last_grad_norm = norm
        _unhooked(torch.optim.AdamW.step)(self)
        return loss


def _plain(grads: list[torch.Tensor]) -> bool:
    """Plain tensors (no subclass: a DTensor's norm is a collective), one device, one dtype."""
    first = grads[0]
    return all(
        type(g) is torch.Tensor and g.device == first.device and g.dtype == first.dtype
        for g in grads
    )


def _unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    # torch wraps a class's step() with its pre/post-hook runner the first time an instance is
    # built. Our own step() is wrapped already; calling a wrapped parent would run the hooks twice.
    while getattr(step, "hooked", False):
        step = step.__wrapped__  # type: ignore[attr-defined]
    return step


def split_decay(
    model: nn.Module, decay_embeddings: bool = False
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): weights of matrix modules decay; norms, biases and embeddings do not.

    Decided by the owning module's type, not by ndim: an embedding is a matrix too, and a tied
    output head shares its weight, so any parameter that an ``nn.Embedding`` owns counts as an
    embedding. Parameters of other module types decay when they are at least 2-D (a custom
    attention's packed weight), unless their module looks like a norm or their name like an
    embedding ("emb" in it, e.g. learned positions kept as a bare Parameter).
    """
    embeddings = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    decay: dict[int, nn.Parameter] = {}
    no_decay: dict[int, nn.Parameter] = {}
    for module in model.modules():
        is_norm = isinstance(module, _NORM_MODULES) or "Norm" in type(module).__name__
        for name, p in module.named_parameters(recurse=False):
            if id(p) in embeddings:
                wants = decay_embeddings
            elif isinstance(module, _MATRIX_MODULES):
                wants = name == "weight"
            else:
                wants = p.ndim >= 2 and not is_norm and "emb" not in name.lower()
            (decay if wants else no_decay)[id(p)] = p
    return list(decay.values()), list(no_decay.values())


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    decay_embeddings: bool = False,
    clip_grad_norm: float | None = 1.0,
    **adamw_kwargs: Any,
) -> ClippedAdamW:
    """AdamW with param groups named 'decay' and 'no_decay' (the ``name`` key of each group).

    >>> opt = build_optimizer(nn.Sequential(nn.Embedding(8, 4), nn.LayerNorm(4), nn.Linear(4, 8)), 1e-3)
    >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
    [('decay', 1, 0.1), ('no_decay', 4, 0.0)]
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must each be in [0, 1), got {betas!r}")
    decay, no_decay = split_decay(model, decay_embeddings)
    groups: Iterable[dict[str, Any]] = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return ClippedAdamW(groups, lr=lr, betas=betas, clip_grad_norm=clip_grad_norm, **adamw_kwargs)
