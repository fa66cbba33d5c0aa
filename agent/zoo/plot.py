"""One PNG per zoo run: loss, LR, log Z and attention max logit per layer, with the alerts marked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from logitwatch.agent.zoo.report import smoothed
from logitwatch.plot import mark_alerts

__all__ = ["plot_run"]


def plot_run(output: Any, score: Any, control: Any, path: Path) -> None:
    """Write ``path``; matplotlib is a dev dependency, so a missing one skips the plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    ax = axes[0]
    steps = list(range(len(output.losses)))
    window = max(10, len(steps) // 15)
    ax.plot(steps, output.losses, color="0.75", lw=0.7, label="loss")
    ax.plot(steps, _finite(smoothed(output.losses, window)), color="k", lw=1.2, label="smoothed")
    if control is not None and control is not output:
        ref = smoothed(control.losses, window)
        ax.plot(range(len(ref)), _finite(ref), "--", color="tab:green", lw=1, label="control")
    ax.set_ylabel("loss (nats)")
    ax.legend(loc="upper right", fontsize=7)
    _lines(axes[1], output.series.get("lr", {}), "LR", log=False)
    _lines(axes[2], output.series.get("logz.mean", {}), "mean log Z", log=False)
    _lines(axes[3], _per_layer_max(output.series.get("attn.logit_max", {})), "attn max |logit|",
           log=True)  # fmt: skip
    bad = [a for a in score.alerts if a.get("severity") in ("warning", "critical")]
    for x in axes:
        mark_alerts(x, bad)  # the colours and firing step of `logitwatch plot`
    if score.diverged_at is not None:
        for x in axes:
            x.axvline(score.diverged_at, color="k", ls="--", lw=1)
    title = f"{output.case} seed {output.seed}: "
    title += (
        f"diverged @{score.diverged_at} ({score.reason})"
        if score.diverged_at is not None
        else "no divergence"
    )
    axes[0].set_title(title + f" — {'pass' if score.passed else 'FAIL'}: {score.why}", fontsize=9)
    axes[3].set_xlabel("step (orange: warning, red: critical, dashed: divergence)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _lines(ax: Any, series: dict[str, list[list[float]]], label: str, log: bool) -> None:
    for name, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, lw=1, label=name or label)
    if len(series) > 1:
        ax.legend(loc="upper left", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(label)


def _per_layer_max(series: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
    """Max over heads per layer (the catalogue's Prometheus view of attn.logit_max)."""
    layers: dict[str, dict[float, float]] = {}
    for name, (xs, ys) in series.items():
        labels = dict(p.split("=", 1) for p in name.split(",") if "=" in p)
        per = layers.setdefault(f"layer {labels.get('layer', '?')}", {})
        for x, y in zip(xs, ys, strict=True):
            per[x] = max(per.get(x, -math.inf), y)
    return {k: [sorted(v), [v[x] for x in sorted(v)]] for k, v in sorted(layers.items())}


def _finite(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) else float("nan") for v in values]
