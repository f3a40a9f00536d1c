"""Combine adapters into one new adapter and write it in PEFT's format.

    lorakit combine math/ code/ --weights 0.7,0.3 --method svd --rank 16 --out merged/

Methods (definitions in lorakit.combine, the same as PEFT's add_weighted_adapter): cat (exact, rank = sum
of the ranks), svd (exact sum truncated to --rank), linear, ties and dare_linear (entry-wise on A and B:
equal targets and ranks needed; ties and dare need --density), ties_svd and dare_linear_svd. The adapters
are loaded onto --model (default: the base the first adapter records, else the embedded model), which must be the
base they were trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .model_option import add_model_option, model_spec

HELP = "combine adapters (cat, svd, linear, ties, dare_linear) into a new adapter"


def add_parser(parser: argparse.ArgumentParser) -> None:
    from ..combine import METHODS

    parser.add_argument("adapters", nargs="+", help="adapter directories (PEFT or lorakit format)")
    parser.add_argument("--out", required=True, help="directory for the combined adapter")
    parser.add_argument("--weights", help="one weight per adapter, comma-separated (default 1.0 each)")
    parser.add_argument("--method", choices=METHODS, default="cat", help="how to combine (default cat: exact)")
    parser.add_argument("--rank", type=int, help="rank of the result for the SVD methods (default: largest input)")
    parser.add_argument("--density", type=float, help="share of entries kept by ties and dare methods, in (0, 1]")
    parser.add_argument("--majority-sign", choices=("total", "frequency"), default="total", help="TIES sign vote")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the dare methods (default 0)")
    add_model_option(parser, from_adapter=True, what="base model (the adapters' shapes are checked against it)")
    parser.add_argument("--task", default="causal-lm", help="causal-lm (default), seq2seq or classification")
    parser.add_argument("--overwrite", action="store_true", help="replace the adapter files in --out")


def run(args: argparse.Namespace) -> int:
    import torch

    import lorakit
    from lorakit.combine import combine, parse_weights
    from lorakit.io import CONFIG_NAME
    from lorakit.models import load_model

    out = Path(args.out)
    sources = [Path(a) for a in args.adapters]
    for source in sources:
        if not (source / CONFIG_NAME).is_file():
            raise ValueError(f"{source} is not an adapter directory (no {CONFIG_NAME}); give adapter directories")
    if any(out.resolve() == s.resolve() for s in sources):
        raise ValueError(f"--out {out} is one of the inputs; write the combined adapter somewhere else")
    if (out / CONFIG_NAME).exists() and not args.overwrite:
        raise ValueError(f"--out {out} already holds an adapter; choose another directory or pass --overwrite")
    weights = parse_weights(args.adapters, args.weights)
    model, _ = load_model(model_spec(args, args.adapters[0]), task=args.task, dtype=torch.float32)
    names = [f"input{i}" for i in range(len(sources))]
    for name, source in zip(names, sources, strict=True):
        lorakit.load_adapter(model, source, name=name)
    report = combine(
        model,
        dict(zip(names, weights, strict=True)),
        "combined",
        args.method,
        rank=args.rank,
        density=args.density,
        majority_sign=args.majority_sign,
        seed=args.seed,
    )
    lorakit.save_adapter(model, out, "combined")
    inputs = ", ".join(f"{s} x {w:g}" for s, w in zip(sources, weights, strict=True))
    print(f"combined {inputs} -> {out}")
    print(report.describe(), file=sys.stderr)
    return 0
