"""Export an adapter for a deployment runtime and check it there.

`--format gguf-lora` writes a llama.cpp / Ollama LoRA adapter that runs over the original GGUF base, then runs
it in llama.cpp (llama-cpp-python) beside lorakit's own adapted model and reports greedy-token agreement, the
largest logit difference and, for prompt files with answers, both sides' exact match. `--format vllm` writes an
adapter directory within vLLM's LoRA constraints (exact fixes applied and named, the rest refused with the way
out), checks it read back by PEFT as vLLM reads it, and prints the `vllm serve` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "export an adapter for llama.cpp / Ollama (GGUF LoRA) or vLLM, and check the result"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter directory (PEFT or lorakit format)")
    parser.add_argument("--model", default="default", help="base model: HF directory, .gguf file or 'default'")
    parser.add_argument("--format", dest="fmt", required=True, choices=("gguf-lora", "vllm"), help="what to write")
    parser.add_argument("--out", required=True, help="what to write: a .gguf file (gguf-lora) or a directory (vllm)")
    parser.add_argument("--dtype", default="f32", choices=("f32", "f16"), help="dtype of the A and B tensors")
    parser.add_argument("--base-gguf", help="the GGUF base for the check (default: --model when it is GGUF)")
    parser.add_argument("--prompts", help="data file whose rows' prompts (and answers) the check uses")
    parser.add_argument("--max-prompts", type=int, default=32, help="most rows of --prompts to check (32)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per prompt without an answer (16)")
    parser.add_argument("--min-agreement", type=float, help="exit 1 when greedy-token agreement is below this (0..1)")
    parser.add_argument("--with-base", action="store_true", help="also check the GGUF base alone (the 'before')")
    parser.add_argument("--report", help="write the parity report as JSON to this file")
    parser.add_argument("--no-parity", action="store_true", help="write the file only, without the llama.cpp check")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from ..export import export_adapter

    if args.max_prompts < 1 or args.max_new_tokens < 1:
        raise ValueError("use --max-prompts >= 1 and --max-new-tokens >= 1")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise ValueError(f"--min-agreement {args.min_agreement} must be between 0 and 1")
    result = export_adapter(
        args.adapter,
        args.out,
        model=args.model,
        fmt=args.fmt,
        dtype=args.dtype,
        base_gguf=args.base_gguf,
        prompts=args.prompts,
        max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens,
        parity=not args.no_parity,
        with_base=args.with_base,
        overwrite=args.overwrite,
    )
    print(result.artifact.describe(), file=sys.stderr)
    if args.fmt == "vllm":
        print(f"run it: {result.artifact.command(Path(args.out).name)}", file=sys.stderr)
    else:
        print(
            f"run it: llama-cli -m BASE.gguf --lora {args.out}   (Ollama: ADAPTER {args.out} in a Modelfile)",
            file=sys.stderr,
        )
    if result.parity is None:
        return 0
    print(result.parity.describe(), file=sys.stderr)
    if result.base_parity is not None:
        print("base GGUF without the adapter: " + result.base_parity.describe(), file=sys.stderr)
    if args.report:
        records = {"adapter": result.parity.as_record()}
        if result.base_parity is not None:
            records["base"] = result.base_parity.as_record()
        with open(args.report, "w") as fh:
            json.dump(records, fh, indent=1)
    if args.min_agreement is not None and result.parity.agreement < args.min_agreement:
        print(
            f"lorakit export: greedy-token agreement {result.parity.agreement:.3f} is below --min-agreement "
            f"{args.min_agreement}",
            file=sys.stderr,
        )
        return 1
    return 0
