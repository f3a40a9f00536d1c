"""The ``--precision`` option of the commands that load a model to compute (generate, eval, merge, export).

Each command resolves the name with ``lorakit.precision.decide`` before it loads anything (``auto`` by the
hardware; one the device lacks is one error line), loads the base in the precision's storage dtype
(``precision.storage``) and its adapter in the trained dtype (``load_adapter(..., adapter_dtype=
precision.trained)``: float32 under the mixed precisions, bf16 under pure bf16), prints ``precision.describe()``
once on stderr when the model is loaded ("precision: bf16-mixed (auto: CPU has AVX512 bf16 instructions)"), and
runs its forwards inside ``precision.context(device)``. ``lorakit train`` reads the same names from the run
config.
"""

from __future__ import annotations

import argparse

from ..precision import PRECISIONS

SUMMARY = (
    "fp32; bf16-mixed (base stored in bfloat16, adapters float32, products under autocast); bf16 (everything "
    "bfloat16); fp16-mixed (CUDA only); auto: bf16-mixed where the hardware multiplies bf16 natively, else fp32"
)


def add_precision_option(parser: argparse.ArgumentParser, *, default: str = "auto", what: str = "") -> None:
    """``--precision`` with ``default``; ``what`` says what it governs when that is not the whole command."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help=f"{what + ': ' if what else ''}{SUMMARY} (default: {default})",
    )
