"""Compare full fine-tuning, bottleneck adapter layers, prompt tuning and LoRA on one model and dataset.

Every method gets the same model, data, seed, step budget, batch and precision (the config's `precision` key,
as in lorakit train: `--set precision=fp32`), and its own learning rate (compare.lr_*). Each runs in a fresh
process; the results go to OUTPUT_DIR/results.md, .json and .png.

    lorakit compare examples/compare.yaml --methods lora,prompt
    lorakit compare examples/compare.yaml --seeds 3      # mean and spread over seeds 0, 1, 2

Each trained model's retention of the base's general behaviour is measured too (compare.retention).
"""

from __future__ import annotations

import argparse

HELP = "measure LoRA against full fine-tuning, adapter layers and prompt tuning"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (the same keys as lorakit train, plus compare.*)")
    parser.add_argument(
        "--methods", help="comma-separated subset of full,adapter,prompt,lora (default: compare.methods)"
    )
    parser.add_argument(
        "--seeds", type=int, metavar="N", help="train every method N times (seeds seed, seed+1, ...; compare.seeds)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..tools.compare import check_methods, run_compare
    from ..train.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        cfg.compare.seeds = args.seeds
    methods = check_methods([m.strip() for m in args.methods.split(",")] if args.methods else cfg.compare.methods)
    records = run_compare(cfg, methods, progress=not args.no_progress)
    return 0 if all(r["status"] == "ok" for r in records) else 1
