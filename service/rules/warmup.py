"""Warmup inferred from a run's own ``lr`` series, for runs whose config declares none.

Hugging Face's Trainer, Lightning and hand-written loops rarely send a schedule. The LR itself
says where warmup ends: at the step where it stops rising (its peak, followed by a plateau or a
decay). A constant LR, or one that decays from its first point, means no warmup. Until the end
is seen, rules that skip warmup treat the run as still warming up, for at most ``CAP`` steps.
A run that reports no lr at all has nothing to go by and counts as having no warmup. The
inference lives in the run's own rule_state row, so every service process agrees.

>>> state = {}
>>> observe(state, [(0, 1e-4), (10, 2e-4), (20, 3e-4), (30, 2.9e-4)])
>>> state["warmup"]["end"]
20
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from logitwatch.service.rules.conditions import RunContext
from logitwatch.service.rules.state import StateRows

__all__ = ["CAP", "KEY", "infer_warmup", "observe", "warmup_end"]

#: The longest warmup inferred: an LR still rising at this step counts as warmed up here, so
#: no run is muted for ever.
CAP = 1000
#: Where the inference lives in the run's state row.
KEY = "warmup"
#: A rise smaller than this (relative) is a plateau: float noise is no warmup.
_RISE = 1e-6


def observe(run_state: dict[str, Any], points: Iterable[tuple[int, float]]) -> None:
    """Feed (step, lr) points in step order; earlier or repeated steps are ignored.

    The state is ``{"peak": lr, "at": step of the peak, "rose": bool, "last": last step seen,
    "end": step}``, ``end`` set once known and never changed after: 0 when the LR never rose.
    """
    st = run_state.setdefault(KEY, {})
    if st.get("end") is not None:
        return
    for step, lr in points:
        if step <= st.get("last", -1) or not math.isfinite(lr):
            continue
        st["last"] = step
        peak = st.get("peak")
        if peak is None or lr > peak * (1 + _RISE):
            st["rose"] = peak is not None
            st["peak"], st["at"] = lr, step
            if step >= CAP:
                st["end"] = CAP
                return
        else:  # the LR stopped rising: warmup ended where the peak was first reached
            st["end"] = st["at"] if st["rose"] else 0
            return


def warmup_end(run_state: dict[str, Any], upto: int) -> int:
    """The first step after warmup; while the LR still rises, the step after ``upto`` (at most
    CAP); 0 when no lr was ever seen."""
    st = run_state.get(KEY, {})
    if st.get("end") is not None:
        return int(st["end"])
    return min(upto + 1, CAP) if "peak" in st else 0


def infer_warmup(ctx: RunContext, rows: StateRows, lr: list, upto: int) -> RunContext:
    """The context to judge this batch with: ``ctx`` itself when the config declares warmup,
    else a copy whose warmup is inferred from the lr points seen so far, this batch's included.

    ``lr`` are the columns of the batch's lr series; ``upto`` its last step.
    """
    if ctx.warmup_declared:
        return ctx
    state = rows.run_state()
    if lr and (state.get(KEY) or {}).get("end") is None:
        steps = np.concatenate([c.steps for c in lr])
        values = np.concatenate([c.values for c in lr])
        order = np.lexsort((-values, steps))  # by step, the largest group LR first
        observe(state, zip(steps[order].tolist(), values[order].tolist(), strict=True))
    return dataclasses.replace(ctx, warmup_steps=warmup_end(state, upto))
