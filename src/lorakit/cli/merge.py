"""Merge an adapter into its base model and write a standard Hugging Face model directory.

The result loads with plain transformers (no lorakit, no PEFT). The merge itself is exact: float32 maths on
the float32 base, rounded once to --dtype. After writing, the directory is loaded back and its logits are
compared with the adapted model's on a probe input; the difference is printed. Both forwards of that check
run in --precision: fp32 by default, so that the figure measures the merge and --dtype's rounding alone
(under bf16-mixed it also holds the bf16 products' own rounding, which differs between the two sides).
With --quantize (an adapter trained by QLoRA on a quantized base) the base is quantized as in training,
dequantized, merged and saved in float; the logit drift that re-quantizing the merged model would cause
is measured and printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .._bnb import QUANT_METHODS
from ..durable import recover, replace_dir
from ..models import DTYPES
from ..precision import Precision, decide
from .model_option import add_model_option, model_spec
from .precision_option import add_precision_option

HELP = "merge an adapter into the base weights and export a plain model directory"


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser, from_adapter=True)
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
    add_precision_option(parser, default="fp32", what="the forwards of the check after the merge")


def run(args: argparse.Namespace) -> int:
    import lorakit
    from lorakit.models import load_model

    out = Path(args.out)
    recover(out.parent, out.name, clean=False)  # an --out that a crash left renamed aside goes back first
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} already exists; choose another directory or pass --overwrite")
    precision = decide(args.precision, "cpu")  # refused before anything loads
    args.model = model_spec(args, args.adapter)
    model, tokenizer = load_model(args.model, task=args.task, dtype=torch.float32)  # the merge's maths: float32
    if args.quantize:
        from lorakit.quant import dequantize, quantize

        print(quantize(model, args.quantize).describe(), file=sys.stderr)
    lorakit.load_adapter(model, args.adapter)
    print(precision.describe(), file=sys.stderr)
    probe = _probe_inputs(model)
    adapted = _reference_logits(args, precision, model, probe)
    if args.quantize:
        dequantize(model)  # float weights equal to what the quantized layers computed with
    plain = lorakit.unload(model, merge=True).to(DTYPES[args.dtype])
    save_merged(plain, tokenizer, out)
    diff = _check_reload(out, args.task, probe, adapted, precision)
    print(f"merged {args.adapter} into {args.model} -> {out} ({args.dtype})")
    both = "" if precision.name == "fp32" else f" (both computed in {precision.name})"
    print(f"reloaded with plain transformers: max |logit diff| vs adapted model = {diff:.2e}{both}", file=sys.stderr)
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


def save_merged(model, tokenizer, out: Path) -> None:
    """Write the merged ``model`` (and ``tokenizer``) as the directory ``out``, staged beside it and swapped in
    (``durable.replace_dir``): a crash at any moment leaves the previous ``out`` or the new one, whole."""
    with replace_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _probe_inputs(model) -> dict[str, torch.Tensor]:
    vocab = getattr(model.config, "vocab_size", 100)
    ids = torch.arange(1, 17).remainder(vocab - 1).add(1).unsqueeze(0)
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def _logits(model, inputs, precision: Precision) -> torch.Tensor:
    with torch.no_grad(), precision.context("cpu"):
        return model(**inputs).logits.float()


def _reference_logits(args: argparse.Namespace, precision: Precision, merging, probe) -> torch.Tensor:
    """The adapted model's logits on ``probe`` in ``precision``: in fp32 those of ``merging`` (the float32 model
    the merge starts from); otherwise of the base loaded again in the precision's storage dtype (quantized as in
    training with --quantize) with its adapter, as lorakit generate or serve would compute them."""
    if precision.storage == torch.float32:
        return _logits(merging, probe, precision)
    import lorakit
    from lorakit.models import load_model

    model, _ = load_model(args.model, task=args.task, dtype=precision.storage)
    if args.quantize:
        from lorakit.quant import quantize

        quantize(model, args.quantize)
    lorakit.load_adapter(model, args.adapter, adapter_dtype=precision.trained)
    return _logits(model, probe, precision)


def _check_reload(directory: Path, task: str, probe, adapted: torch.Tensor, precision: Precision) -> float:
    from lorakit.models import load_model

    reloaded, _ = load_model(directory, task=task, dtype=precision.storage)
    return (_logits(reloaded, probe, precision) - adapted).abs().max().item()
