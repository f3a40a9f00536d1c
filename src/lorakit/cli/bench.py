"""Training step, memory and forward cost of lorakit LoRA against PEFT LoRA and full fine-tuning.

Each mode runs in a fresh process; modes alternate and repeat; the table gives medians, tokens/s, peak
memory and the ratios to PEFT and to full fine-tuning, plus a check that lorakit and PEFT losses agree
over 20 steps from identical weights. PEFT modes need `pip install peft`. Modes: lorakit, peft, full,
lorakit-gc, peft-gc (gradient checkpointing), lorakit-lean, peft-lowrss (allocator policy), lorakit-hf-loss
(lorakit with the model's own `.loss`, the loop a user writes without lorakit.causal_lm_loss), and the
forwards base, lorakit-unmerged, lorakit-merged, peft-unmerged. --precision fp32,bf16-mixed,bf16 runs every
mode in each precision (PEFT under the same autocast), in rows named MODE PRECISION with their ratios to fp32;
the default, auto, is the precision lorakit train picks on this machine.
"""

from __future__ import annotations

import argparse

HELP = "benchmark training step, memory and forward cost against PEFT and full fine-tuning"


def add_parser(parser: argparse.ArgumentParser) -> None:
    from ..tools.benchmark import add_arguments

    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..tools.benchmark import run as run_benchmark

    return run_benchmark(args)
