"""The ``--model`` option of the commands that load a base model, and the base an adapter implies.

A model is named three ways: a Hugging Face Hub id (``org/name``, ``org/name@revision``, ``org/name:file.gguf``;
resolved through the Hugging Face cache, downloaded when missing and online), a local path (a Hugging Face model
directory or a .gguf file), or ``default`` (the embedded SmolLM2-135M-Instruct, no network needed). Commands
that take an adapter default to the base it records (its ``base_model_name_or_path`` and ``revision``, as PEFT
writes them), then to ``default``.
"""

from __future__ import annotations

import argparse
import sys

MODEL_HELP = (
    "a Hugging Face Hub id (org/name, org/name@revision, org/name:file.gguf), a local model directory or .gguf "
    "file, or 'default' (the embedded SmolLM2-135M-Instruct)"
)


def add_model_option(parser: argparse.ArgumentParser, *, from_adapter: bool = False, what: str = "base model") -> None:
    """``--model``; ``from_adapter``: its default is the base the command's adapter records."""
    default = "the base the adapter records, else 'default'" if from_adapter else "'default'"
    parser.add_argument(
        "--model", default=None if from_adapter else "default", help=f"{what}: {MODEL_HELP} (default: {default})"
    )


def model_spec(args: argparse.Namespace, adapter: str | None) -> str:
    """``--model`` when given; else the base the adapter directory ``adapter`` records (said on stderr), else
    ``default``."""
    if args.model:
        return args.model
    if adapter:
        from ..io import base_model_of

        base = base_model_of(adapter)
        if base:
            print(f"lorakit: base model {base} (recorded by the adapter; --model overrides)", file=sys.stderr)
            return base
    return "default"
