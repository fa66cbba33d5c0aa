"""`logitwatch presets`: the lecture's model table, as this decoder builds it."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from logitwatch.agent.reference.presets import PRESETS, preset_row
from logitwatch.tables import Col, Records, num


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--full", action="store_true", help="the published sizes (default: the small CPU sizes)"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _count(n: float, spec: str = ".1f") -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:{spec}}{unit}"
    return str(int(n))


def run(args: argparse.Namespace) -> int:
    rows = [preset_row(name, full=args.full) for name in PRESETS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    title = "published sizes" if args.full else "small sizes (same ratios, CPU-trainable)"
    columns = [Col("name", readable=10), *map(num, ("layers", "heads", "kv", "hd", "d_model")),
               *map(num, ("nh·hd/d", "d_ff/d", "d/L")), "FFN", num("params")]  # fmt: skip
    columns += [num("paper")] if args.full else []
    table = Records(columns, title=f"presets: {title}", gap=1)
    for r in rows:
        paper = [_count(r["published_params"], "g")] if args.full else []
        table.add_row(
            r["name"],
            str(r["n_layers"]),
            str(r["n_heads"]),
            str(r["n_kv_heads"]),
            str(r["head_dim"]),
            str(r["d_model"]),
            f"{r['head_ratio']:.2f}",
            f"{r['ff_ratio']:.2f}",
            f"{r['aspect']:.0f}",
            r["ffn"],
            _count(r["params"]),
            *paper,
        )
    console = Console()
    console.print(table)
    if args.full:
        console.print(
            "t5 and t5-v1.1 are encoder-decoders; here their 48 layers form one decoder-only "
            "stack without cross-attention. PaLM's head_dim is 256 (the paper), not 258."
        )
    return 0
