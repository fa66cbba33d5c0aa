"""`logitwatch lint`: check a preset or a config file against the lecture's consensus."""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap

from logitwatch.agent.reference.lint import TrainSettings, lint, load_lint_config
from logitwatch.agent.reference.presets import get_preset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", metavar="NAME", help="a preset (see `logitwatch presets`)")
    what.add_argument("--config", metavar="FILE", help="a TOML or JSON config file")
    parser.add_argument("--full", action="store_true", help="the preset's published size")
    parser.add_argument("--warmup", type=int, metavar="N", help="LR warmup steps")
    parser.add_argument("--weight-decay", type=float, metavar="X", help="AdamW weight decay")
    parser.add_argument("--strict", action="store_true", help="exit 1 when there is a warning")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args: argparse.Namespace) -> int:
    if args.preset:
        config, train = get_preset(args.preset, full=args.full), TrainSettings()
        label = f"preset {args.preset}{' (full)' if args.full else ' (small)'}"
    else:
        config, train, label = load_lint_config(args.config)
    train = TrainSettings(
        warmup=train.warmup if args.warmup is None else args.warmup,
        weight_decay=train.weight_decay if args.weight_decay is None else args.weight_decay,
    )
    findings = lint(config, train)
    warnings = sum(f.severity == "warning" for f in findings)
    if args.json:
        print(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        # The terminal's width (COLUMNS, else 80 when piped), up to 96 for a comfortable measure;
        # words longer than a line are never broken, so figures and names stay whole.
        width = min(shutil.get_terminal_size((80, 24)).columns, 96)

        def fill(text: str, first: str = "", rest: str = "") -> str:
            return textwrap.fill(text, width, initial_indent=first, subsequent_indent=rest,
                                 break_long_words=False, break_on_hyphens=False)  # fmt: skip

        print(fill(f"{label}: {config.n_layers} layers, d_model {config.d_model}, "
                   f"{config.n_heads}x{config.head_dim} heads ({config.n_kv_heads} kv), "
                   f"d_ff {config.d_ff} {config.ffn}", rest="  "))  # fmt: skip
        for f in findings:
            print()
            print(fill(f"{f.rule}: {f.message}", f"{f.severity.upper():8}", " " * 8))
            for label_, text in (("why", f.reason), ("source", f.source)):
                print(fill(text, f"  {label_}: ", "    "))
        print(
            f"\n{len(findings)} finding(s): {warnings} warning(s), {len(findings) - warnings} info."
        )
    return 1 if args.strict and warnings else 0
