"""`lorakit` entry point: dispatches to a subcommand and turns user errors into one clear line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from . import bench as bench_cmd
from . import combine as combine_cmd
from . import compare as compare_cmd
from . import eval as eval_cmd
from . import export as export_cmd
from . import generate as generate_cmd
from . import inspect as inspect_cmd
from . import merge as merge_cmd
from . import quiet
from . import serve as serve_cmd
from . import train as train_cmd
from . import ui as ui_cmd

SUBCOMMANDS = {
    "train": train_cmd,
    "eval": eval_cmd,
    "generate": generate_cmd,
    "merge": merge_cmd,
    "export": export_cmd,
    "combine": combine_cmd,
    "inspect": inspect_cmd,
    "compare": compare_cmd,
    "serve": serve_cmd,
    "bench": bench_cmd,
    "ui": ui_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="LoRA fine-tuning toolkit with PEFT-compatible adapter files."
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        module.add_parser(sub.add_parser(name, help=module.HELP, description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = quiet.call(_dispatch, args)
    if under_torchrun():
        _exit_now(code)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return SUBCOMMANDS[args.command].run(args) or 0
    except (ValueError, TypeError, OSError, FileExistsError) as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or a training run's SIGINT / SIGTERM (lorakit.train.signals)
        code = getattr(err, "exit_code", 130)
        print(f"lorakit {args.command}: interrupted{f' ({err})' if str(err) else ''}", file=sys.stderr)
        return code


def under_torchrun() -> bool:
    """One of several processes that torchrun started (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _exit_now(code: int) -> None:
    """End a torchrun process once its command is done, without the interpreter's shutdown.

    Everything the run writes is written and closed by now. What is left are gloo's worker threads: one may
    still be releasing the last collective (a barrier that holds the tensors of an all-gather before it), and
    releasing a tensor takes the GIL. Should the interpreter already be shutting down at that moment, Python
    ends that thread inside a C++ destructor, which aborts the whole process (SIGABRT, "terminate called
    without an active exception") after a successful run. Leaving with os._exit skips that shutdown.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
