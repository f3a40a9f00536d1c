"""Merge an adapter into its base model and write a standard Hugging Face model directory.

The result loads with plain transformers (no lorakit, no PEFT). After writing, the directory is loaded
back and its logits are compared with the adapted model's on a probe input; the difference is printed.
With --quantize (an adapter trained by QLoRA on a quantized base) the base is quantized as in training,
dequantized, merged and saved in float; the logit drift that re-quantizing the merged model would cause
is measured and printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from .._bnb import QUANT_METHODS
from ..models import DTYPES

HELP = "merge an adapter into the base weights and export a plain model directory"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="base model: HF directory, .gguf file or 'default'")
    parser.add_argument("--adapter", required=True, help="adapter directory (PEFT or lorakit format)")
    parser.add_argument("--out", required=True, help="output directory for the merged model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    parser.add_argument("--task", default="causal-lm", help="causal-lm (default), seq2seq or classification")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    parser.add_argument(
        "--quantize",
        choices=QUANT_METHODS,
        help="the adapter was trained on this quantized base (QLoRA): merge into its dequantized weights, save in "
        "float, and report what re-quantizing the merged model would change",
    )


def run(args: argparse.Namespace) -> int:
    import lorakit
    from lorakit.models import load_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} already exists; choose another directory or pass --overwrite")
    model, tokenizer = load_model(args.model, task=args.task, dtype=torch.float32)
    if args.quantize:
        from lorakit.quant import dequantize, quantize

        print(quantize(model, args.quantize).describe(), file=sys.stderr)
    lorakit.load_adapter(model, args.adapter)
    probe = _probe_inputs(model)
    with torch.no_grad():
        adapted = _logits(model, probe)
    if args.quantize:
        dequantize(model)  # float weights equal to what the quantized layers computed with
    plain = lorakit.unload(model, merge=True).to(DTYPES[args.dtype])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    diff = _check_reload(out, args.task, probe, adapted)
    print(f"merged {args.adapter} into {args.model} -> {out} ({args.dtype})")
    print(f"reloaded with plain transformers: max |logit diff| vs adapted model = {diff:.2e}", file=sys.stderr)
    if args.quantize:
        from lorakit.quant import requantization_drift

        drift = requantization_drift(plain, args.quantize, probe)
        print(
            f"merged into the dequantized {args.quantize} base and saved in {args.dtype}, not {args.quantize}: "
            f"re-quantizing the merged weights to {args.quantize} would move the logits by up to "
            f"{drift['max_abs']:.3g} (mean {drift['mean_abs']:.3g}) and change the top-1 token at "
            f"{drift['top1_changed']:.1%} of the probe positions",
            file=sys.stderr,
        )
    return 0


def _probe_inputs(model) -> dict[str, torch.Tensor]:
    vocab = getattr(model.config, "vocab_size", 100)
    ids = torch.arange(1, 17).remainder(vocab - 1).add(1).unsqueeze(0)
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def _logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits.float()


def _check_reload(directory: Path, task: str, probe, adapted: torch.Tensor) -> float:
    from lorakit.models import load_model

    reloaded, _ = load_model(directory, task=task, dtype=torch.float32)
    with torch.no_grad():
        return (_logits(reloaded, probe) - adapted).abs().max().item()
