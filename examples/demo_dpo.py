"""`make demo-dpo`: preference-tune the embedded SmolLM2-135M-Instruct with DPO on the bundled dates task.

Generates the preference pairs (dates in words; chosen: written as YYYY-MM-DD, rejected: as DD/MM/YYYY;
1,000 train and 200 held-out pairs), trains with examples/dpo.yaml (the reference model is the base itself:
the adapter switched off), and prints before / after on the held-out pairs: how often the model ranks the
chosen answer first and the reward accuracy, and how often its own greedy answers follow the preferred
behaviour (the checker: the answer is a date written as YYYY-MM-DD). Leaves the adapter in out/dpo-dates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.data import chat_prompt_ids, read_rows
from lorakit.train.config import load_config
from lorakit.train.evaluate import generate_batch
from lorakit.train.trainer import train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_preferences  # noqa: E402 - the generator lives beside this script

REQUIRED_ACCURACY, REQUIRED_FOLLOWS = 0.90, 0.80


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts answered by generation")
    args = parser.parse_args()
    started = time.perf_counter()
    train_path, eval_path = make_preferences.write(HERE / "data")
    print(f"data: {train_path.name} and {eval_path.name} in {train_path.parent}")
    cfg = load_config(HERE / "dpo.yaml", ["overwrite=true", *args.overrides])
    result = train(cfg)
    before, after = result.eval_before, result.eval
    (base_follows, tuned_follows, tuned_right), shown = generated_answers(
        cfg, eval_path, args.prompts, result.precision
    )
    wall = time.perf_counter() - started
    print(f"\n{'held-out prompt':<56} {'base model':<30} tuned")
    for question, base, tuned in shown:
        print(f"{question:<56} {base.strip()[:28]!r:<30} {tuned.strip()!r}")
    print(f"\nheld-out pairs ({after.pairs}): the model ranks the chosen answer first {100 * before.prefers_chosen:.1f}% "
          f"before -> {100 * after.prefers_chosen:.1f}% after; reward accuracy after {100 * after.accuracy:.1f}% "
          f"(margin {after.metrics['margin']:.2f})")  # fmt: skip
    print(f"greedy answers written as YYYY-MM-DD ({args.prompts} held-out prompts): {100 * base_follows:.1f}% before -> "
          f"{100 * tuned_follows:.1f}% after ({100 * tuned_right:.1f}% the right date)")  # fmt: skip
    print(
        f"training: {result.steps} steps at {result.tokens_per_second:.0f} tokens/s; demo wall time {wall / 60:.1f} min"
    )
    print(result.precision.describe())
    print(f"adapter: {result.output_dir}  (try: lorakit generate --adapter {result.output_dir} --chat "
          f"'{make_preferences.QUESTION.format('May 3rd, 1999')}')")  # fmt: skip
    ok = after.accuracy >= REQUIRED_ACCURACY and tuned_follows >= REQUIRED_FOLLOWS
    print("PASS" if ok else "FAIL", f"(required: reward accuracy >= {REQUIRED_ACCURACY:.0%} and answers following the "
          f"preference >= {REQUIRED_FOLLOWS:.0%})")  # fmt: skip
    if not ok:
        raise SystemExit(1)


def generated_answers(
    cfg, eval_path: Path, n: int, precision, shown: int = 6
) -> tuple[tuple[float, float, float], list]:
    """(share of greedy answers the checker accepts, base and tuned; share of tuned answers that are exactly the
    chosen answer), and a few answers side by side; generated in the run's ``precision``."""
    model, tokenizer = lorakit.load_model(cfg.model, dtype=precision.storage)
    lorakit.load_adapter(model, cfg.output_dir)
    rows = [row for _, row in read_rows(eval_path)[:n]]
    prompts = [chat_prompt_ids(tokenizer, row["prompt"]) for row in rows]
    tuned, base = [], []
    with torch.no_grad(), precision.context(model.device):
        for start in range(0, len(prompts), 50):
            chunk = prompts[start : start + 50]
            tuned += generate_batch(model, tokenizer, chunk, cfg.train.max_new_tokens)
            with lorakit.disabled(model):
                base += generate_batch(model, tokenizer, chunk, cfg.train.max_new_tokens)
    follows = make_preferences.follows
    questions = [row["prompt"][-1]["content"] for row in rows]
    right = sum(t.strip() == row["chosen"] for t, row in zip(tuned, rows, strict=True))
    shares = (sum(map(follows, base)) / len(rows), sum(map(follows, tuned)) / len(rows), right / len(rows))
    return shares, list(zip(questions, base, tuned, strict=True))[:shown]


if __name__ == "__main__":
    main()
