"""The benchmark's points, made the same way for logitwatch and its peers (numpy only).

Values are float32 random walks, as the agent's on-device reductions produce them, widened to
float64; times are wall-clock seconds at millisecond precision, about 0.5 s a step.
"""

from __future__ import annotations

import numpy as np

T0 = 1_767_225_600.0  # 2026-01-01, a fixed start so that every run of the benchmark is alike


def block(series: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, values and times of ``n`` points of one series from step ``start``."""
    rng = np.random.default_rng((series, start))
    steps = np.arange(start, start + n, dtype=np.int64)
    walk = 1.0 + 0.01 * np.cumsum(rng.standard_normal(n, dtype=np.float32))
    values = (walk * (1 + series % 7)).astype(np.float32).astype(np.float64)
    jitter = rng.uniform(-0.05, 0.05, n)
    times = np.round(T0 + steps * 0.5 + jitter, 3)
    return steps, values, times


def series_labels(i: int, n_heads: int = 10) -> dict[str, str]:
    """The i-th series of a batch: attention logits of layer i // heads, head i % heads."""
    return {"layer": str(i // n_heads), "head": str(i % n_heads)}
