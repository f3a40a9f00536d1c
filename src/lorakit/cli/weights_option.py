"""The ``--weights`` option of the commands that decode (serve, generate, eval): what the frozen base's linear
layers are stored as while they compute, beside ``--precision`` (``lorakit.weights``).

``precision``: as the precision stores the base (float32, or bfloat16 under bf16-mixed and bf16); ``int8``:
int8 weight-only products with per-output-channel scales (a quarter of float32's bytes; activations in bf16);
``auto``: int8 where the precision computes in bf16 (bf16-mixed, bf16) on a CPU that multiplies bf16 natively,
else ``precision``. The command applies it once the model and its adapters are loaded
(``apply_weights``) and prints what it chose and why on stderr.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from ..precision import Precision, native_bf16
from ..weights import WEIGHT_MODES, quantize_int8, resolve_weights


def add_weights_option(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument(
        "--weights",
        choices=WEIGHT_MODES,
        default=default,
        help="the base's linear weights while decoding: precision (as --precision stores them), int8 (weight-only "
        "int8, per-channel scales, bf16 activations: a quarter of float32's bytes per token), auto (int8 under a "
        f"bf16 precision on a CPU with native bf16, else precision) (default: {default})",
    )


def apply_weights(model: nn.Module, mode: str, device: torch.device | str, precision: Precision) -> str:
    """Store ``model``'s base as ``mode`` asks on ``device`` under the resolved ``precision``; returns the line
    that says what was chosen."""
    device = torch.device(device)
    chosen, why = resolve_weights(mode, device, native_bf16(device)[0], precision.name)
    if chosen == "precision":
        return f"weights: as the precision stores them ({why})"
    return f"weights: int8 ({why}); {quantize_int8(model).describe().removeprefix('int8 weights: ')}"
