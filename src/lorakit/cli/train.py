"""Fine-tune a model with LoRA from one YAML config (also under torchrun for several processes).

lorakit train examples/dates.yaml --set train.lr=1e-3 --set output_dir=out/try
torchrun --nproc_per_node 2 -m lorakit train examples/dates.yaml
"""

from __future__ import annotations

import argparse

HELP = "fine-tune with LoRA from a YAML config"


def add_parser(parser: argparse.ArgumentParser) -> None:
    from ..train.config import reference_text

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "config keys (YAML, or --set key=value):\n" + reference_text()
    parser.add_argument("config", nargs="?", help="YAML config file (omit to start from the defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar: a log line every train.log_every steps instead"
    )


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from ..train.config import load_config
    from ..train.trainer import TrainingStopped, train

    overrides = list(args.overrides) + (["overwrite=true"] if args.overwrite else [])
    cfg = load_config(args.config, overrides)
    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except TrainingStopped as err:
        print(f"lorakit train: stopped: {err}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun the summary comes from rank 0 alone
    if result.eval is not None and result.eval_before is not None and result.eval.versus(result.eval_before):
        print(result.eval.versus(result.eval_before))
    skipped = f", {result.skipped_steps} skipped for NaN or infinite values" if result.skipped_steps else ""
    print(
        f"adapter written to {result.output_dir} ({result.steps} steps{skipped}, "
        f"median {result.tokens_per_second:.0f} tokens/s a step)"
    )
    return 0
