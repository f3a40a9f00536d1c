"""Inspect an adapter: per-layer rank, scaling, update norm, effective rank and energy in the top singular
values, a PNG heat map over layers and module types, and with --compare the cosine similarity of two
adapters' updates layer by layer. Reads the adapter file alone; --model adds ||dW|| / ||W|| per layer.

    lorakit inspect runs/my-adapter
    lorakit inspect runs/a --compare runs/b --png a-vs-b.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import durable
from .model_option import MODEL_HELP

HELP = "per-layer statistics, heat map and comparison of adapters"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter directory (PEFT or lorakit format)")
    parser.add_argument("--compare", help="a second adapter directory: cosine similarity of the updates per layer")
    parser.add_argument("--model", help=f"base model, adds ||dW|| / ||W||: {MODEL_HELP}")
    parser.add_argument("--task", default="causal-lm", help="with --model: causal-lm, seq2seq or classification")
    parser.add_argument("--top", type=int, default=4, help="k for the 'energy in the top k' column (default 4)")
    parser.add_argument("--png", help="heat map file (default: inspect-<adapter name>.png here)")
    parser.add_argument("--json", help="also write the statistics as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from lorakit.analysis import format_table, heat_map, inspect_adapter

    model = None
    if args.model:
        import torch

        from lorakit.models import load_model

        model, _ = load_model(args.model, task=args.task, dtype=torch.float32)
    result = inspect_adapter(args.adapter, compare=args.compare, model=model, top_k=args.top)
    print(format_table(result))
    png = Path(args.png) if args.png else Path(f"inspect-{Path(args.adapter).resolve().name}.png")
    heat_map(result, png)
    print(f"heat map: {png}", file=sys.stderr)
    if args.json:
        durable.write_text(Path(args.json), json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"statistics: {args.json}", file=sys.stderr)
    return 0
