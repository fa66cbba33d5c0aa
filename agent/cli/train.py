"""``logitwatch train``: train a preset or a config file on the stdlib corpus and summarise.

Precedence: TrainConfig defaults < ``--config FILE`` < flags. Values are converted here rather
than by argparse so that a bad one is one line naming the setting, like every other error.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["add_arguments", "run", "summary_table"]

_S = (
    argparse.SUPPRESS
)  # a flag that is not given stays out of the namespace: the file's value holds

#: flag -> (TrainConfig field, converter name, help)
_VALUES: dict[str, tuple[str, str, str]] = {
    "--preset": ("preset", "str", "gpt3 | t5 | t5-v1.1 | lamda | palm | llama2 (default llama2)"),
    "--z-loss": ("z_loss", "float", "z-loss coefficient, e.g. 1e-4 (PaLM); 0 = off"),
    "--softcap-attn": (
        "softcap_attn",
        "cap",
        "soft-cap attention logits at C (Gemma 2: 50), or off",
    ),
    "--softcap-final": (
        "softcap_final",
        "cap",
        "soft-cap output logits at C (Gemma 2: 30), or off",
    ),
    "--ffn": ("ffn", "str", "relu | gelu | swiglu | geglu | reglu"),
    "--lr": ("lr", "float", "peak learning rate (default 3e-3)"),
    "--warmup": ("warmup", "int", "warmup steps (default 10%% of steps, at most 100)"),
    "--schedule": ("schedule", "str", "cosine | sgdr | constant (default cosine)"),
    "--min-lr-ratio": ("min_lr_ratio", "float", "LR floor as a fraction of peak (default 0.1)"),
    "--t0": ("t0", "int", "SGDR: first period in steps (default a third of the steps)"),
    "--t-mult": ("t_mult", "int", "SGDR: period multiplier (default 1)"),
    "--weight-decay": ("weight_decay", "float", "AdamW decoupled weight decay (default 0.1)"),
    "--adam-eps": ("adam_eps", "float", "AdamW epsilon (default 1e-8)"),
    "--clip-grad-norm": (
        "clip_grad_norm",
        "cap",
        "clip the gradient norm at C (default 1), or off",
    ),
    "--dropout": ("dropout", "float", "attention and residual dropout (default: the preset's, 0)"),
    "--seed": ("seed", "int", "random seed (default 0)"),
    "--steps": ("steps", "int", "optimizer steps (default 200)"),
    "--batch-size": ("batch_size", "int", "sequences per step (default 16)"),
    "--seq-len": ("seq_len", "int", "bytes per sequence (default 128)"),
    "--device": ("device", "str", "auto | cpu | cuda | cuda:N (default auto)"),
    "--corpus-bytes": ("corpus_bytes", "int", "bytes of stdlib source to read (default 4e6)"),
    "--save-every": ("save_every", "int", "write a checkpoint every N steps (default 0: none)"),
    "--save-dir": ("save_dir", "str", "checkpoint directory (default .logitwatch/checkpoints)"),
    "--resume": ("resume", "str", "continue from a checkpoint file, or a directory's latest"),
    "--metrics-out": ("metrics_out", "str", "write one JSON object per step to FILE"),
    "--log-every": ("log_every", "int", "read the loss on the host every N steps (default 10)"),
    "--server": ("server", "str", "send metrics to a logitwatch service at URL"),
    "--run": ("run", "str", "run name on the service"),
    "--spool": ("spool", "str", "spool directory for metrics while the service is away"),
    "--every": ("every", "int", "monitor reporting interval in steps (default 10)"),
    "--param-every": (
        "param_every",
        "int",
        "read the weights every N steps, a multiple of "
        "--every (default: the first multiple at or above 10)",
    ),
    "--on-alert": ("on_alert", "list", "on a firing alert: checkpoint,lower-lr,stop (comma list)"),
}
_SWITCHES = {"--full": "full", "--qk-norm": "qk_norm", "--bf16": "bf16", "--fp16": "fp16",
             "--progress": "progress"}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", default=_S, help="settings from a TOML or JSON file"
    )
    for flag, (_, kind, help_text) in _VALUES.items():
        metavar = {"int": "N", "float": "X", "cap": "C|off"}.get(kind, "VALUE")
        parser.add_argument(flag, metavar=metavar, default=_S, help=help_text)
    helps = {"full": "the published size (not for a CPU)", "qk_norm": "RMSNorm on q and k per head",
             "bf16": "bf16 autocast", "fp16": "fp16 autocast, no loss scaler",
             "progress": "progress bar (default on)"}  # fmt: skip
    for flag, name in _SWITCHES.items():
        parser.add_argument(
            flag, dest=name, action=argparse.BooleanOptionalAction, default=_S, help=helps[name]
        )


def _convert(name: str, kind: str, raw: str) -> Any:
    if kind == "str":
        return raw
    if kind == "list":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind == "cap" and raw.lower() in ("off", "none"):
        return "off" if name.startswith("softcap") else None
    try:
        return int(raw) if kind == "int" else float(raw)
    except ValueError:
        want = (
            "an integer" if kind == "int" else "a number" + (' or "off"' if kind == "cap" else "")
        )
        raise ValueError(f"{name} must be {want}; got {raw!r}.") from None


def config_from_args(args: argparse.Namespace) -> Any:
    """The TrainConfig that the flags (and ``--config``) describe."""
    from logitwatch.agent.reference.train_config import TrainConfig, load_config_file

    given = vars(args)
    settings: dict[str, Any] = {}
    if "config" in given:
        settings.update(load_config_file(given["config"]))
        settings["config_file"] = given["config"]
    for _flag, (name, kind, _) in _VALUES.items():
        if name in given:
            settings[name] = _convert(name, kind, given[name])
    settings.update({name: given[name] for name in _SWITCHES.values() if name in given})
    return TrainConfig.from_dict(settings)


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """The summary after training: a name and a value a line."""
    table = Table(title=title, show_header=False)
    table.add_column(no_wrap=True)
    # Paths and URLs are single long words: fold them rather than cut them at 80 columns.
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def run(args: argparse.Namespace) -> int:
    from logitwatch.agent.reference.train import train

    cfg = config_from_args(args)
    result = train(cfg)
    n_params = sum(p.numel() for p in result.model.parameters())
    tail = result.losses[-10:]
    rows = [
        ("parameters", f"{n_params:,}"),
        ("steps", f"{result.start_step} → {result.end_step}"),
        ("first loss", f"{result.losses[0]:.4f}"),
        ("last loss (mean of last 10)", f"{sum(tail) / len(tail):.4f}"),
        ("validation loss", "-" if result.val_loss is None else f"{result.val_loss:.4f}"),
        ("tokens/s", f"{result.tokens_per_s:,.0f}"),
        ("time", f"{result.seconds:.1f} s"),
    ]
    if result.checkpoint:
        rows.append(("checkpoint", result.checkpoint))
    if cfg.metrics_out:
        rows.append(("metrics", cfg.metrics_out))
    if cfg.server or cfg.run or cfg.spool:
        where = cfg.server or cfg.spool
        rows.append(("monitored run", result.run + (f" → {where}" if where else "")))
    undelivered = result.undelivered
    if undelivered is not None:
        rows.append(("undelivered", f"{undelivered.steps} steps spooled: see below"))
    Console().print(summary_table(f"logitwatch train: {cfg.preset or 'config'}", rows))
    if undelivered is not None:
        # Plain lines, not table cells: the command must survive a narrow terminal unwrapped.
        print(undelivered.message, flush=True)
    return 0
