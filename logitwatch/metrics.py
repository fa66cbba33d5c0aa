"""The metric catalogue: every metric the agent reports, its labels, unit and meaning.

The service's Prometheus exposition names its gauges from it and folds per-head series by
it; tests hold the dashboards' queries and the README's metric table to it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATALOGUE", "LABEL_KEYS", "MetricSpec", "prometheus_name", "spec"]

#: The label keys the catalogue uses. User metrics may add others (see protocol.py).
LABEL_KEYS = ("layer", "head", "group", "rank")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    labels: tuple[str, ...]
    unit: str
    help: str
    #: Labels dropped for Prometheus exposition (aggregated with max) to keep cardinality bounded.
    prom_drop: tuple[str, ...] = ()


_SPECS = [
    MetricSpec("loss", (), "nats", "training loss (cross-entropy plus z-loss when on)"),
    MetricSpec("loss.ce", (), "nats", "cross-entropy part of the training loss"),
    MetricSpec("loss.z", (), "nats", "z-loss term coef*mean(logsumexp(logits)^2)"),
    MetricSpec("lr", ("group",), "1", "learning rate of each optimizer param group"),
    MetricSpec("logits.max_abs", (), "1", "max |logit| of the output logits before soft-capping"),
    MetricSpec("logits.rms", (), "1", "RMS of the output logits before soft-capping"),
    MetricSpec("logits.mean", (), "1", "mean of the output logits before soft-capping"),
    MetricSpec("logz.mean", (), "nats", "mean over tokens of log Z = logsumexp(logits)"),
    MetricSpec("logz.std", (), "nats", "std over tokens of log Z"),
    MetricSpec("logz.max", (), "nats", "max over tokens of log Z"),
    MetricSpec("logz.min", (), "nats", "min over tokens of log Z"),
    MetricSpec(
        "attn.logit_max",
        ("layer", "head"),
        "1",
        "max |q.k/sqrt(d)| over every query row and key it attends, before soft-capping",
        prom_drop=("head",),
    ),
    MetricSpec("attn.entropy_min", ("layer",), "nats", "min attention entropy over heads and rows"),
    MetricSpec("attn.entropy_mean", ("layer",), "nats", "mean attention entropy"),
    MetricSpec(
        "attn.entropy_frac",
        ("layer",),
        "1",
        "mean attention entropy as a fraction of log(number of keys)",
    ),
    MetricSpec("attn.q_norm", ("layer",), "1", "RMS of the queries fed to the dot product"),
    MetricSpec("attn.k_norm", ("layer",), "1", "RMS of the keys fed to the dot product"),
    MetricSpec("grad.norm", ("layer",), "1", "gradient L2 norm before clipping (no label: global)"),
    MetricSpec("param.norm", ("layer",), "1", "parameter L2 norm (no label: global)"),
    MetricSpec("update.ratio", ("layer",), "1", "||w_t - w_{t-1}|| / ||w_{t-1}|| of the last step"),
    MetricSpec("act.rms", ("layer",), "1", "residual-stream RMS after each block"),
    MetricSpec("nonfinite.count", (), "1", "NaN/Inf values seen in loss, logits or gradients"),
    MetricSpec("throughput.tokens_per_s", (), "tokens/s", "training throughput"),
]

CATALOGUE: dict[str, MetricSpec] = {s.name: s for s in _SPECS}


def spec(name: str) -> MetricSpec | None:
    return CATALOGUE.get(name)


#: Suffixes Prometheus reserves for counters, histograms and summaries, and the abbreviated
#: units promtool rejects: a gauge named with them is renamed so that `promtool check
#: metrics` stays clean ('nonfinite.count' -> logitwatch_nonfinite_values).
_PROM_SUFFIXES = {
    "_count": "_values",
    "_total": "_total_value",
    "_sum": "_sum_value",
    "_bucket": "_bucket_value",
    "_per_s": "_per_second",
}


def prometheus_name(metric: str) -> str:
    """'attn.logit_max' -> 'logitwatch_attn_logit_max' (Prometheus naming: one prefix, base units).

    >>> prometheus_name("throughput.tokens_per_s"), prometheus_name("nonfinite.count")
    ('logitwatch_throughput_tokens_per_second', 'logitwatch_nonfinite_values')
    """
    name = "logitwatch_" + metric.replace(".", "_")
    for suffix, replacement in _PROM_SUFFIXES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + replacement
    return name
