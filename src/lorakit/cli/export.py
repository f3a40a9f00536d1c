"""Export an adapter for a deployment runtime and check it there.

`--format gguf-lora` writes a llama.cpp / Ollama LoRA adapter that runs over the original GGUF base; `--format
gguf` merges the adapter into the base and writes one standalone GGUF (tokenizer, chat template and end-of-turn
token from the base's GGUF); `--format ollama` writes a directory with a Modelfile and the merged GGUF (by default)
or, with `--ollama-layout adapter`, the base GGUF plus the adapter under `ADAPTER`, which Ollama 0.34.1 and later
reject at `ollama create` (ollama PR 14969; printed with that layout); `--format vllm` writes an adapter directory
within vLLM's LoRA constraints (exact fixes applied and named, the rest refused with the way out). Each is then run
by other implementations (llama.cpp through llama-cpp-python, transformers' GGUF loader, PEFT for vLLM's reading)
beside lorakit's own adapted model: greedy-token agreement, the largest logit difference and, for prompt files with
answers, each side's exact match. The command that runs the export is printed. lorakit's side of the checks
computes in --precision: fp32 by default, the exact reference (the figures then measure the file and its runtime
alone; bf16-mixed would add bf16 products' own noise on lorakit's side and blur the comparison).

Where the check's runtime is not installed (llama-cpp-python for the GGUF formats, PEFT for vLLM), the export
is written all the same, one line says that parity was not checked and how to install what checks it, --report
records `"parity": "not checked"`, and the command exits 0; --require-parity (and --min-agreement, which
needs the figure) makes that an error before anything is written.

A command that fails leaves nothing at --out (with --overwrite, what was there stays as it was): a required
check that cannot run stops it before anything is written, and an export or a check that fails afterwards
discards the artifact. A result below --min-agreement is a finished, checked export: it is kept, and the
command exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .model_option import add_model_option, model_spec
from .precision_option import add_precision_option

# Kept here rather than imported so that `lorakit --help` does not import the export stack (gguf, numpy).
FORMATS = ("gguf-lora", "gguf", "ollama", "vllm")
OLLAMA_LAYOUTS = ("merged", "adapter")
DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")

HELP = "export an adapter for llama.cpp / Ollama (GGUF, LoRA or merged) or vLLM, and check the result"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter directory (PEFT or lorakit format)")
    add_model_option(parser, from_adapter=True)
    parser.add_argument("--format", dest="fmt", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", required=True, help="a .gguf file (gguf-lora, gguf) or a directory (ollama, vllm)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="adapter tensors (gguf-lora, ollama --ollama-layout adapter): f32 (default) or f16; merged weights "
        "(gguf, ollama): f16 (default), f32, bf16, q8_0, q5_1, q5_0, q4_1, q4_0",
    )
    parser.add_argument(
        "--ollama-layout",
        choices=OLLAMA_LAYOUTS,
        help="ollama: merged (default): one standalone merged GGUF; adapter: the base GGUF + ADAPTER, which Ollama "
        "0.34.1 and later reject at `ollama create` (ollama PR 14969)",
    )
    parser.add_argument("--merged", action="store_true", help="ollama: same as --ollama-layout merged (the default)")
    parser.add_argument("--base-gguf", help="the GGUF base for the check (default: --model when it is GGUF)")
    parser.add_argument("--prompts", help="data file whose rows' prompts (and answers) the check uses")
    parser.add_argument("--max-prompts", type=int, default=32, help="most rows of --prompts to check (32)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per prompt without an answer (16)")
    parser.add_argument("--min-agreement", type=float, help="exit 1 when greedy-token agreement is below this (0..1)")
    parser.add_argument("--with-base", action="store_true", help="also check the GGUF base alone (the 'before')")
    parser.add_argument("--report", help="write the parity report as JSON to this file")
    parser.add_argument("--no-parity", action="store_true", help="write the export only, without the checks")
    parser.add_argument(
        "--require-parity",
        action="store_true",
        help="fail (exit 2, nothing written) when the check cannot run here (llama-cpp-python, or PEFT for vllm, not "
        "installed); by default the export is then written unchecked and says so",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_precision_option(parser, default="fp32", what="lorakit's side of the checks")


def run(args: argparse.Namespace) -> int:
    from ..export import ExportRequest, ParityOptions, run_export
    from ..export.parity import missing_runtime
    from ..precision import decide

    if args.max_prompts < 1 or args.max_new_tokens < 1:
        raise ValueError("use --max-prompts >= 1 and --max-new-tokens >= 1")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise ValueError(f"--min-agreement {args.min_agreement} must be between 0 and 1")
    _check_report_path(args.report)
    if args.min_agreement is not None and not args.no_parity and (why := missing_runtime(args.fmt)):
        raise ValueError(
            f"--min-agreement needs the parity check, which cannot run: {why}; nothing was written (drop "
            "--min-agreement to write the export unchecked)"
        )
    checks = ParityOptions(
        enabled=not args.no_parity,
        required=args.require_parity,
        prompts=args.prompts,
        max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens,
        with_base=args.with_base,
        precision=args.precision,  # decided (and refused) by the export, before anything is written
    )
    request = ExportRequest(
        args.adapter,
        args.out,
        model=model_spec(args, args.adapter),
        fmt=args.fmt,
        dtype=args.dtype,
        base_gguf=args.base_gguf,
        ollama_layout=args.ollama_layout,
        merged=args.merged,
        overwrite=args.overwrite,
        parity=checks,
    )
    result = run_export(request)
    print(result.artifact.describe(), file=sys.stderr)
    print(f"run it: {result.run}", file=sys.stderr)
    if caveat := getattr(result.artifact, "caveat", None):
        print(f"lorakit export: note: {caveat}", file=sys.stderr)
    if result.parity is None:
        reason = result.unchecked or "--no-parity"
        if result.unchecked:
            print(
                f"lorakit export: parity not checked: {result.unchecked}; --require-parity makes this an error",
                file=sys.stderr,
            )
        if args.report:
            _write_report(Path(args.report), {"parity": "not checked", "reason": reason})
        return 0
    computing = decide(args.precision, "cpu")  # what lorakit's side of the checks computed in
    print(computing.describe(), file=sys.stderr)
    for name, report in result.checks.items():
        print(f"{name}: {report.describe()}", file=sys.stderr)
    drift = result.checks.get("transformers")
    if drift is not None and args.dtype not in (None, "f32") and computing.name == "fp32":
        print(
            f"rounding the merged weights to {args.dtype} moves lorakit's logits by up to {drift.max_logit_diff:.3g} "
            f"and keeps its greedy token at {100 * drift.agreement:.1f}% of {drift.tokens} positions (transformers' "
            "float32 reading of the file)",
            file=sys.stderr,
        )
    if args.report:
        _write_report(Path(args.report), {name: report.as_record() for name, report in result.checks.items()})
    if args.min_agreement is not None and result.parity.agreement < args.min_agreement:
        print(
            f"lorakit export: greedy-token agreement {result.parity.agreement:.3f} is below --min-agreement "
            f"{args.min_agreement}",
            file=sys.stderr,
        )
        return 1
    return 0


def _check_report_path(report: str | None) -> None:
    """--report must be writable before the export starts: found unwritable only afterwards, it would fail a
    command whose artifact is already in place."""
    if report is None:
        return
    path = Path(report)
    if path.is_dir():
        raise ValueError(f"--report {path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise ValueError(f"--report {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"--report {path}: the folder {path.parent} is not writable")


def _write_report(path: Path, records: dict) -> None:
    """The parity report as JSON, replacing ``path`` in one rename (never half written)."""
    from ..io import atomic_write_many

    atomic_write_many({path: json.dumps(records, indent=1).encode()})
