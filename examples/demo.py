"""`make demo`: fine-tune the embedded SmolLM2-135M-Instruct with LoRA on the bundled dates task.

Generates the task data (dates in words -> ISO 8601; 2,000 train and 200 held-out rows), trains with
examples/dates.yaml (precision auto: bf16-mixed where the CPU multiplies bf16 natively, else fp32; the run
prints which and why), prints held-out exact-match accuracy before and after, shows a few answers of the
base and the tuned model side by side, and leaves the adapter in out/dates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.data import read_rows, tokenize_rows
from lorakit.train.config import load_config
from lorakit.train.evaluate import generate_batch
from lorakit.train.trainer import train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_dates  # noqa: E402 - the generator lives beside this script

REQUIRED_AFTER, REQUIRED_GAIN = 0.80, 0.50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    started = time.perf_counter()
    train_path, eval_path = make_dates.write(HERE / "data")
    print(f"data: {train_path.name} and {eval_path.name} in {train_path.parent}")
    cfg = load_config(HERE / "dates.yaml", ["overwrite=true", *args.overrides])
    result = train(cfg)
    before, after = result.eval_before.exact_match, result.eval.exact_match
    show_side_by_side(cfg, eval_path, result.precision)
    wall = time.perf_counter() - started
    print(f"\nheld-out exact match: {100 * before:.1f}% before -> {100 * after:.1f}% after ({result.eval.scored} rows)")
    print(
        f"training: {result.steps} steps at {result.tokens_per_second:.0f} tokens/s; demo wall time {wall / 60:.1f} min"
    )
    print(result.precision.describe())
    print(f"adapter: {result.output_dir}  (try: lorakit generate --adapter {result.output_dir} --chat 'May 3rd, 1999' "
          f"--system '{make_dates.SYSTEM}')")  # fmt: skip
    ok = after >= REQUIRED_AFTER and after - before >= REQUIRED_GAIN
    print("PASS" if ok else "FAIL", f"(required: >= {REQUIRED_AFTER:.0%} after and >= {REQUIRED_GAIN:.0%} points gain)")
    if not ok:
        raise SystemExit(1)


def show_side_by_side(cfg, eval_path: Path, precision, rows: int = 6) -> None:
    """A few held-out answers of the base and the tuned model, generated in the run's ``precision``."""
    model, tokenizer = lorakit.load_model(cfg.model, dtype=precision.storage)
    lorakit.load_adapter(model, cfg.output_dir)
    examples, _ = tokenize_rows(read_rows(eval_path)[:rows], tokenizer, cfg.data.max_length, True)
    prompts = [e.prompt_ids for e in examples]
    with torch.no_grad(), precision.context(model.device):
        tuned = generate_batch(model, tokenizer, prompts, cfg.train.max_new_tokens)
        with lorakit.disabled(model):
            base = generate_batch(model, tokenizer, prompts, cfg.train.max_new_tokens)
    print(f"\n{'input':<40} {'reference':<12} {'base model':<28} tuned")
    for (_, row), b, t in zip(read_rows(eval_path)[:rows], base, tuned, strict=True):
        question, answer = row["messages"][1]["content"], row["messages"][2]["content"]
        mark = "ok" if t.strip() == answer else "x"
        print(f"{question:<40} {answer:<12} {b.strip()[:26]!r:<28} {t.strip()!r} {mark}")


if __name__ == "__main__":
    main()
