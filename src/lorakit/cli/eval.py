"""Evaluate a model, with or without an adapter, on a dataset: loss, perplexity, exact match.

The model computes in --precision (default auto: bf16-mixed on a CPU with native bf16 products, else fp32);
bf16-mixed's figures are fp32's to bf16 rounding (the embedded model's loss on 48 dates rows: 0.7102 against
0.7125).

--retention measures how much of the base model's general behaviour the tuned model kept (``lorakit.train.retention``):
drift (KL divergence and top-1 agreement of the next-token distributions on general text) and kept knowledge
(the share of the probes the base answers right that the tuned model still answers right). The tuned model is
the base with --adapter (one model, the adapter switched off for the base), or a merged or fully fine-tuned
--model directory, compared with --base (default: the base its run recorded). Without --data only retention is
measured; with --data both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .model_option import add_model_option, model_spec
from .precision_option import add_precision_option
from .weights_option import add_weights_option, apply_weights

HELP = "evaluate a model or adapter on a dataset"


def add_parser(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser, from_adapter=True)
    parser.add_argument("--adapter", help="adapter directory; omit to evaluate the base model")
    parser.add_argument(
        "--data",
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
    parser.add_argument(
        "--retention",
        action="store_true",
        help="measure what the tuned model (--adapter, or a merged / fully fine-tuned --model directory) kept of "
        "its base: KL divergence and top-1 agreement on general text, and the share of the probes the base "
        "answers right that it still answers right (with --data as well, both are measured)",
    )
    parser.add_argument(
        "--base",
        metavar="MODEL",
        help="with --retention and a merged or fully fine-tuned --model: the base to compare it with (default: the "
        "model its training run recorded in config.yaml)",
    )
    parser.add_argument(
        "--retention-texts",
        metavar="FILE",
        help='general text for the drift figures instead of the shipped set: JSONL, one {"text": ...} a line',
    )
    parser.add_argument(
        "--retention-probes",
        metavar="FILE",
        help="probes for kept knowledge instead of the shipped set: JSONL, one "
        '{"question": ..., "choices": [...], "answer": INDEX or TEXT} a line',
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="lm-evaluation-harness tasks (comma-separated) run before and after the adapter (or against --base "
        "for a merged / fully fine-tuned --model), printing every metric's change; needs lorakit[eval]",
    )
    parser.add_argument(
        "--lm-eval-include", metavar="DIR", help="a folder of your own lm-evaluation-harness task YAML files"
    )
    parser.add_argument("--lm-eval-limit", type=int, metavar="N", help="at most N documents per lm-eval task")
    parser.add_argument("--lm-eval-fewshot", type=int, metavar="K", help="few-shot examples per lm-eval task")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
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
    _check_retention_options(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    harness_tasks = _harness_tasks(args)  # unknown tasks are refused before anything loads
    precision = decide(args.precision, "cpu")  # refused before anything loads
    columns = _columns(args.columns)
    if columns_problem(columns):
        raise ValueError(f"--columns {args.columns}: {columns_problem(columns)}")
    sets = _retention_sets(args) if args.retention else None  # a bad file is refused before anything loads
    compares = args.retention or harness_tasks is not None  # a tuned model against its base
    base_spec = None if args.adapter or not compares else _recorded_base(args)
    args.model = model_spec(args, args.adapter)
    model, tokenizer = lorakit.load_model(args.model, task=args.task, dtype=precision.storage)
    task = TASKS[args.task]
    if tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer files")
    if args.adapter:
        lorakit.load_adapter(model, args.adapter, adapter_dtype=precision.trained)
    base = None  # with --adapter: the same model with the adapter off
    if base_spec is not None:
        base = model if base_spec == args.model else lorakit.load_model(base_spec, dtype=precision.storage)[0]
    print(precision.describe(), file=sys.stderr)
    if args.weights != "precision":  # the default measures the model as it was trained and stored
        print(apply_weights(model, args.weights, "cpu", precision), file=sys.stderr)
        if base is not None and base is not model:
            apply_weights(base, args.weights, "cpu", precision)
    record: dict = {}
    lines: list[str] = []
    if args.data:
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
                batch_size=args.batch_size,
            )
        record.update(result.as_record())
        lines.append(_data_lines(result, len(examples), args.show))
    if args.retention:
        report = _measure_retention(args, precision, base, model, tokenizer, sets, base_spec)
        record["retention"] = report.as_record()
        lines += [report.summary(), report.describe()]
    if harness_tasks is not None:
        scores = _run_harness(args, precision, base, model, tokenizer, harness_tasks)
        record["lm_eval"] = [score.as_record() for score in scores]
        from lorakit.harness import table

        lines.append(table(scores))
    print(json.dumps(record) if args.json else "\n".join(lines))
    return 0


def _data_lines(result, rows: int, show: int) -> str:
    text = f"rows {rows}  loss {result.loss:.4f}  perplexity {result.perplexity:.2f}"
    if result.exact_match is not None:
        text += f"  exact match {100 * result.exact_match:.1f}% ({result.scored} scored)"
    for prompt, reference, answer in result.samples[:show]:
        text += f"\n  {prompt_tail(prompt)!r}\n    want {reference!r}  got {answer!r}"
    return text


def _check_retention_options(args: argparse.Namespace) -> None:
    """One error line for options that do not go together, before anything is read or loaded."""
    if not args.data and not args.retention and not args.lm_eval:
        raise ValueError(
            "give --data (a dataset to evaluate on), --retention (what a tuned model kept of its base), --lm-eval "
            "TASKS (lm-evaluation-harness tasks before and after), or several"
        )
    for option in ("retention_texts", "retention_probes"):
        if getattr(args, option) and not args.retention:
            raise ValueError(f"--{option.replace('_', '-')} is an option of --retention; add --retention")
    for option in ("lm_eval_include", "lm_eval_limit", "lm_eval_fewshot"):
        if getattr(args, option) is not None and not args.lm_eval:
            raise ValueError(f"--{option.replace('_', '-')} is an option of --lm-eval; add --lm-eval TASKS")
    if args.base and not (args.retention or args.lm_eval):
        raise ValueError("--base is an option of --retention and --lm-eval; add one of them")
    if args.lm_eval and not args.adapter and not args.model:
        raise ValueError(
            "--lm-eval compares a tuned model with its base: give --adapter DIR, or --model DIR (a merged or fully "
            "fine-tuned model) with --base MODEL"
        )
    if not args.retention:
        return
    if args.task != "causal-lm":
        raise ValueError(f"--retention compares causal language models; --task {args.task} is not one")
    if args.adapter and args.base:
        raise ValueError(
            "--base is the base of a merged or fully fine-tuned --model directory; with --adapter, --model names "
            "the base (default: the one the adapter records)"
        )
    if not args.adapter and not args.model:
        raise ValueError(
            "--retention compares a tuned model with its base: give --adapter DIR, or --model DIR (a merged or fully "
            "fine-tuned model) with --base MODEL"
        )


def _recorded_base(args: argparse.Namespace) -> str:
    """The base of a merged or fully fine-tuned --model: --base, else the ``model`` its run's config.yaml names."""
    if args.base:
        return args.base
    directory = Path(args.model)
    if (directory / "adapter_config.json").is_file():
        raise ValueError(f"--model {args.model} is an adapter directory: pass it as --adapter {args.model}")
    config = directory / "config.yaml"
    if config.is_file():
        import yaml

        try:
            recorded = yaml.safe_load(config.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{config} is not valid YAML ({err}); name the base with --base MODEL") from None
        if isinstance(recorded, dict) and isinstance(recorded.get("model"), str) and recorded["model"]:
            print(f"lorakit: base model {recorded['model']} (recorded in {config}; --base overrides)", file=sys.stderr)
            return recorded["model"]
    raise ValueError(
        f"--model {args.model} records no base model (a fully fine-tuned run's config.yaml does; a merged model "
        "directory does not): name it with --base MODEL, e.g. --base default"
    )


def _retention_sets(args: argparse.Namespace):
    from lorakit.train.retention import load_probes, load_texts

    texts = load_texts(args.retention_texts, what="--retention-texts")
    probes = load_probes(args.retention_probes, what="--retention-probes")
    return texts, probes


def _measure_retention(args, precision, base, model, tokenizer, sets, base_spec):
    from lorakit.train.retention import measure_retention

    texts, probes = sets
    tuned = f"{args.model} + {args.adapter}" if args.adapter else args.model
    against = "the same model with the adapter off" if args.adapter else base_spec
    shipped = " (shipped sets)" if not (args.retention_texts or args.retention_probes) else ""
    print(
        f"retention: {tuned} against {against}, on {len(texts)} texts and {len(probes)} probes{shipped}",
        file=sys.stderr,
    )
    with precision.context("cpu"):
        return measure_retention(
            base,
            model,
            tokenizer,
            texts,
            probes,
            batch_size=args.batch_size,
            max_length=args.max_length,
            progress=not args.no_progress,
        )


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


def _harness_tasks(args: argparse.Namespace) -> tuple[list[str], object] | None:
    """(--lm-eval's task names, the harness's task manager), checked; None without --lm-eval."""
    if not args.lm_eval:
        return None
    from lorakit.harness import check_tasks, task_manager

    if args.lm_eval_limit is not None and args.lm_eval_limit < 1:
        raise ValueError(f"--lm-eval-limit must be >= 1, got {args.lm_eval_limit}")
    manager = task_manager(args.lm_eval_include)
    return check_tasks(manager, args.lm_eval.split(",")), manager


def _run_harness(args, precision, base, model, tokenizer, harness_tasks):
    from lorakit.harness import before_and_after

    tasks, manager = harness_tasks
    against = "the same model with the adapter off" if args.adapter else args.base or "its recorded base"
    print(f"lm-eval: {', '.join(tasks)} on {args.model} against {against}", file=sys.stderr)
    return before_and_after(
        model, tokenizer, tasks, manager, base=base, batch_size=args.batch_size, limit=args.lm_eval_limit,
        num_fewshot=args.lm_eval_fewshot, context=lambda: precision.context("cpu"),
    )  # fmt: skip
