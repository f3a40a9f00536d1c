"""Evaluate a model, with or without an adapter, on a dataset: loss, perplexity, exact match.

The model computes in --precision (default auto: bf16-mixed on a CPU with native bf16 products, else fp32);
bf16-mixed's figures are fp32's to bf16 rounding (the embedded model's loss on 48 dates rows: 0.7102 against
0.7125).
"""

from __future__ import annotations

import argparse
import json
import sys

from .model_option import add_model_option, model_spec
from .precision_option import add_precision_option
from .weights_option import add_weights_option, apply_weights

HELP = "evaluate a model or adapter on a dataset"


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser, from_adapter=True)
    parser.add_argument("--adapter", help="adapter directory; omit to evaluate the base model")
    parser.add_argument(
        "--data",
        required=True,
        help=".jsonl / .csv / .parquet file, saved dataset, or Hugging Face Hub dataset id (org/name, "
        "org/name:config, org/name[split]; without a split: validation, else test)",
    )
    parser.add_argument(
        "--columns",
        metavar="MAP",
        help="rename the data's columns as data.columns does: 'alpaca' (instruction/input/output into prompt + "
        "completion), or TARGET=COLUMN pairs separated by commas, e.g. prompt=question,completion=answer",
    )
    parser.add_argument("--task", default="causal-lm", help="causal-lm (default), seq2seq or classification")
    parser.add_argument("--max-length", type=int, default=512, help="truncate rows to this many tokens")
    parser.add_argument("--max-rows", type=int, help="evaluate only the first N rows")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="token limit of generated answers")
    parser.add_argument("--no-generate", action="store_true", help="loss and perplexity only")
    parser.add_argument(
        "--show", type=int, default=3, help="generate and print this many sample answers (default 3; 0: none)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_precision_option(parser)
    add_weights_option(parser, default="precision")


def run(args: argparse.Namespace) -> int:
    import lorakit
    from lorakit.data import EVAL_SPLITS, columns_problem, read_rows, tokenize_rows
    from lorakit.precision import decide
    from lorakit.train.evaluate import evaluate
    from lorakit.train.tasks import TASKS

    if args.show < 0:
        raise ValueError(f"--show must be >= 0, got {args.show}")
    precision = decide(args.precision, "cpu")  # refused before anything loads
    columns = _columns(args.columns)
    if columns_problem(columns):
        raise ValueError(f"--columns {args.columns}: {columns_problem(columns)}")
    args.model = model_spec(args, args.adapter)
    model, tokenizer = lorakit.load_model(args.model, task=args.task, dtype=precision.storage)
    task = TASKS[args.task]
    if tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer files")
    if args.adapter:
        lorakit.load_adapter(model, args.adapter, adapter_dtype=precision.trained)
    print(precision.describe(), file=sys.stderr)
    if args.weights != "precision":  # the default measures the model as it was trained and stored
        print(apply_weights(model, args.weights, "cpu", precision), file=sys.stderr)
    rows = read_rows(args.data, columns, splits=EVAL_SPLITS)[: args.max_rows]
    examples, _ = tokenize_rows(
        rows,
        tokenizer,
        args.max_length,
        True,
        lambda row, where: task.tokenize(row, where, tokenizer, True, model.config),
    )
    with precision.context("cpu"):
        result = evaluate(
            model,
            tokenizer,
            examples,
            generate=not args.no_generate,
            max_new_tokens=args.max_new_tokens,
            samples=args.show,
            task=task,
        )
    if args.json:
        print(json.dumps(result.as_record()))
        return 0
    print(f"rows {len(examples)}  loss {result.loss:.4f}  perplexity {result.perplexity:.2f}", end="")
    print(
        f"  exact match {100 * result.exact_match:.1f}% ({result.scored} scored)"
        if result.exact_match is not None
        else ""
    )
    for prompt, reference, answer in result.samples[: args.show]:
        print(f"  {prompt_tail(prompt)!r}\n    want {reference!r}  got {answer!r}")
    return 0


def prompt_tail(prompt: str, width: int = 100) -> str:
    """The end of a sample's prompt (what the answer continues), at most ``width`` characters; '…' marks a cut.

    The whole prompt would repeat a chat template's system turn on every sample; a single line of it misses
    the question of a multi-line prompt that ends with it.
    """
    text = prompt.strip()
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _columns(text: str | None) -> dict[str, str] | str | None:
    """--columns as data.columns: a preset name, or {target: column} from TARGET=COLUMN[,TARGET=COLUMN...]."""
    if not text or "=" not in text:
        return text
    pairs = [part.partition("=") for part in text.split(",") if part.strip()]
    bad = [f"{t}{eq}{c}" for t, eq, c in pairs if not (t.strip() and eq and c.strip())]
    if bad:
        raise ValueError(
            f"--columns {text}: {bad[0]!r} is not TARGET=COLUMN; e.g. --columns prompt=question,completion=answer"
        )
    return {t.strip(): c.strip() for t, _, c in pairs}
