"""Gradient, parameter and update norms, global and per layer, reduced on the device.

Per-tensor norms come from one fused ``torch._foreach_norm`` call; squares are summed per
layer with ``index_add_``, so the cost is a few kernels whatever the number of parameters.
Under torch.distributed each rank reduces only its local shards (no DTensor op, hence no
collective) and hands out weighted squares that the Monitor sums across ranks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["ParamStats", "layer_of_param", "shard_weight"]


def _dtensor_type() -> type | None:
    """DTensor's class once FSDP2 or tensor parallelism loaded it (never imported to check)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def shard_weight(p: torch.Tensor, world: int) -> float:
    """The share of ``p``'s squared norm that one rank's local copy stands for: summed over
    the ranks, the weighted local squares make the global squared norm. A DTensor's shard
    counts once per replica of the shards (FSDP2: 1; HSDP: 1/replicas); a plain tensor is a
    whole replica on every rank (DDP): 1/world."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(p, dtensor):
        shards = 1
        for dim, placement in enumerate(p.placements):
            if placement.is_shard():
                shards *= p.device_mesh.size(dim)
        return shards / world
    return 1.0 / world


def layer_of_param(prefixes: dict[str, int]) -> Callable[[str], int | None]:
    """Map a parameter name to its layer by the longest matching module prefix ("blocks.3")."""
    ordered = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))

    def layer(name: str) -> int | None:
        for prefix, i in ordered:
            if name.startswith(prefix + "."):
                return i
        return None

    return layer


class ParamStats:
    """Norm reductions over a model's trainable parameters, grouped into its layers.

    Outputs put the global value first, then one per layer in ``self.layers`` order.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        layer_of: Callable[[str], int | None],
        device: torch.device,
        *,
        world: int | None = None,
    ) -> None:
        self.params: list[nn.Parameter] = []
        owners: list[int | None] = []
        seen: set[int] = set()
        for name, p in named_params:
            if p.requires_grad and id(p) not in seen:  # tied weights count once
                seen.add(id(p))
                self.params.append(p)
                owners.append(layer_of(name))
        self.layers: list[int] = sorted({i for i in owners if i is not None})
        slot = {layer: j for j, layer in enumerate(self.layers)}
        # Parameters outside any layer go to a spill slot that only the global sum sees.
        self.index = torch.tensor(
            [slot.get(i, len(self.layers)) if i is not None else len(self.layers) for i in owners],
            dtype=torch.long,
            device=device,
        )
        self.device = device
        dtensor = _dtensor_type()
        # FSDP2 parameters are DTensors, whose every norm would be a collective: read shards.
        self._dtensor = dtensor if any(isinstance(p, dtensor or ()) for p in self.params) else None
        # ``world`` given (torch.distributed): outputs are weighted squares, rooted by the caller
        # after summing them across ranks.
        self.squared = world is not None
        self.weight = (
            torch.tensor([shard_weight(p, world) for p in self.params], device=device)
            if world is not None
            else None
        )
        self._prev: list[torch.Tensor] | None = None
        self._prev_sq: torch.Tensor | None = None
        self._cur_sq: torch.Tensor | None = None
        self._seen: tuple | None = None  # the weights weights() last read (see _identity)
        self._kept = False  # _prev holds a copy of those weights (weights(keep=True))
        self._groups = _cache_groups([self.local(p.detach()) for p in self.params], device)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a DTensor; any other tensor as it is."""
        return t.to_local() if self._dtensor is not None and isinstance(t, self._dtensor) else t

    def _sq_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self._dtensor is not None:
            tensors = [self.local(t) for t in tensors]
        return self._stack_sq(torch._foreach_norm(tensors))

    def _stack_sq(self, norms: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([n.to(self.device, torch.float32) for n in norms]).square()

    def _grouped(
        self, sq: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if weight is not None:
            sq = sq * weight
        per = torch.zeros(len(self.layers) + 1, device=self.device).index_add_(0, index, sq)
        return torch.cat([sq.sum().reshape(1), per[:-1]])  # squared: global, per layer

    def _root(self, sq: torch.Tensor) -> torch.Tensor:
        return sq if self.squared else sq.sqrt()

    @torch.no_grad()
    def grads(self, norms: list[torch.Tensor | None] | None = None) -> torch.Tensor | None:
        """(global, *per layer) gradient L2 norms, then the number of gradient tensors holding
        a NaN or Inf; None when no parameter has a gradient. ``norms``: per-parameter norms
        already taken (during backward) instead of reading ``p.grad`` now."""
        if norms is None:
            norms = [p.grad for p in self.params]
            have = [j for j, g in enumerate(norms) if g is not None]
            sq = self._sq_norms([norms[j] for j in have]) if have else None
        else:
            have = [j for j, n in enumerate(norms) if n is not None]
            sq = torch.stack([norms[j].to(self.device) for j in have]).square() if have else None
        if sq is None:
            return None
        whole = len(have) == len(self.params)
        index = self.index if whole else self.index[have]
        weight = self.weight if whole or self.weight is None else self.weight[have]
        nonfinite = (~torch.isfinite(sq)).sum().float().reshape(1)
        return torch.cat([self._root(self._grouped(sq, index, weight)), nonfinite])

    def _identity(self) -> tuple:
        """What changes whenever the weights may have: each parameter's version counter (in-place
        writes: optimizer steps, load_state_dict) and its local storage (``p.data = ...``)."""
        return tuple((p._version, self.local(p).data_ptr()) for p in self.params)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the weights (before an optimizer step) for the update ratio. The copy lives in
        one buffer kept across steps: fresh memory each time costs page faults on the CPU.
        Nothing to copy when weights(keep=True) left a copy of these very weights."""
        same = self._seen is not None and self._identity() == self._seen
        if same and self._kept:
            self._prev_sq = self._cur_sq
            return
        cur = [self.local(p.detach()) for p in self.params]
        if self._prev is None:
            self._prev = [t.clone() for t in cur]
        else:
            torch._foreach_copy_(self._prev, cur)
        # The weights have not moved since weights() took their norms: those are ||w_prev||.
        self._prev_sq = self._cur_sq if same else self._sq_norms(self._prev)
        self._kept = False

    @torch.no_grad()
    def weights(self, keep: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(global, *per layer) weight norms, and ||w - w_prev|| / ||w_prev|| when a snapshot
        was taken since the last call. ``squared``: the weighted squares of the norms, and
        of the update's numerator then denominator, concatenated.

        ``keep``: leave a copy of the weights in the snapshot buffer, for a snapshot() before
        the next step (reporting every step) that then has nothing to copy. The difference,
        both norms and that copy are taken one cache-sized group of tensors at a time, so each
        weight is read from memory once."""
        cur = [self.local(p.detach()) for p in self.params]
        if self._prev is None or self._prev_sq is None:
            self._cur_sq = cur_sq = self._sq_norms(cur)
            self._seen, self._kept = self._identity(), False
            return self._root(self._grouped(cur_sq, self.index, self.weight)), None
        prev, delta, now = self._prev, [], []
        for group in self._groups:
            old, new = [prev[j] for j in group], [cur[j] for j in group]
            torch._foreach_sub_(old, new)  # in place: w_prev - w, no extra memory
            delta.extend(torch._foreach_norm(old))
            now.extend(torch._foreach_norm(new))
            if keep:
                torch._foreach_copy_(old, new)
        self._cur_sq = cur_sq = self._stack_sq(now)
        self._seen, self._kept = self._identity(), keep
        norms = self._root(self._grouped(cur_sq, self.index, self.weight))
        delta_sq = self._grouped(self._stack_sq(delta), self.index, self.weight)
        prev_sq = self._grouped(self._prev_sq, self.index, self.weight)
        self._prev_sq = None  # the buffer holds the difference or the new weights, not w_prev
        if self.squared:
            return norms, torch.cat([delta_sq, prev_sq])
        return norms, (delta_sq / prev_sq.clamp_min(1e-30)).sqrt()


#: Bytes of weights the update ratio handles at a time on the CPU: its difference, norms and
#: copy then read each weight from memory once, the rest from cache (L2-sized).
CACHE_BYTES = 1 << 20


def _cache_groups(params: list[torch.Tensor], device: torch.device) -> list[list[int]]:
    """Indices of ``params`` in consecutive groups of about CACHE_BYTES on the CPU (a tensor
    larger than that alone); one group elsewhere, where fewer, larger launches win."""
    if device.type != "cpu":
        return [list(range(len(params)))] if params else []
    groups: list[list[int]] = []
    size = CACHE_BYTES
    for j, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if size + nbytes > CACHE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(j)
        size += nbytes
    return groups
