"""Training throughput and memory without packing and with both `data.packing_strategy`s, on rows of varied lengths.

    .venv/bin/python bench/packing.py [--steps 6] [--max-length 512] [--batch 8] [--model default]

The data: the bundled dates task's chat rows (about 48 tokens each) mixed with one in eight longer rows
(prompt/completion rows that list 6 to 40 dates and their ISO forms, 100 to 500 tokens). `lorakit train` runs
the same number of steps of `--batch` sequences each way (LoRA r=16 on all linear layers, float32, no
evaluation), each in its own process. Reported: the median step time after the first step, the real (non-pad)
tokens per second, the share of padding in the batches the steps saw, and the peak RSS (VmHWM). Then the
sequences each packing makes of the whole training set, beside TRL's `pack_dataset` (best-fit decreasing) on
the same token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples"))

from dpo_speed import cpu_name  # noqa: E402 - beside this script

from lorakit.tools.benchmark import alternate_in_processes, peak_rss_bytes  # noqa: E402


def write_data(directory: Path) -> Path:
    import datetime as dt

    import make_dates

    train, _ = make_dates.write(directory / "dates")
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rng = random.Random(0)
    start = dt.date(1900, 1, 1).toordinal()
    mixed = []
    for i, row in enumerate(rows):
        mixed.append(row)
        if i % 7 == 6:
            dates = [dt.date.fromordinal(start + rng.randrange(70000)) for _ in range(rng.randrange(6, 40))]
            prompt = "Write each date as YYYY-MM-DD:\n" + "\n".join(
                make_dates.phrase(d, rng.randrange(4)) for d in dates
            )
            mixed.append({"prompt": prompt, "completion": "\n".join(d.isoformat() for d in dates)})
    path = directory / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return path


MODES = ("plain", "in_order", "bfd")


def worker(args) -> None:
    from lorakit.train import loop, trainer
    from lorakit.train.config import load_config
    from lorakit.train.metrics import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp))
        cfg = load_config(
            None,
            [
                f"model={args.model}", f"output_dir={Path(tmp) / 'out'}", f"data.train={data}",
                f"data.max_length={args.max_length}", f"data.packing={args.mode != 'plain'}", "lora.r=16",
                f"data.packing_strategy={'bfd' if args.mode == 'plain' else args.mode}",
                "lora.alpha=32", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                "train.eval_before=false",
            ],
        )  # fmt: skip
        seen = {"real": 0, "slots": 0}
        step = loop.Loop._step

        def counting(self, indices):
            rows = [self.rows[i] for i in indices]
            width = max(len(r.input_ids) for r in rows)
            seen["real"] += sum(len(r.input_ids) for r in rows)
            seen["slots"] += width * len(rows)
            return step(self, indices)

        loop.Loop._step = counting
        trainer.train(cfg, progress=False)
        records = [r for r in read_metrics(Path(tmp) / "out" / "metrics.jsonl") if r["kind"] == "train"]
    median = statistics.median(r["seconds"] for r in records[1:])
    real_per_step = seen["real"] / len(records)
    print(json.dumps({"mode": args.mode, "median_step_s": median, "real_tokens_per_s": real_per_step / median,
                      "padding_share": 1 - seen["real"] / seen["slots"], "peak_rss_bytes": peak_rss_bytes()}))  # fmt: skip


def sequences_table(args) -> str:
    """Sequences and fill of the whole training set: lorakit's two strategies and TRL's best-fit decreasing."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    from lorakit.data import pack, read_rows, tokenize_rows
    from lorakit.models import load_model

    _, tokenizer = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        rows, _ = tokenize_rows(read_rows(write_data(Path(tmp))), tokenizer, args.max_length, True)
    tokens = sum(len(r.input_ids) for r in rows)
    counts = {f"lorakit {s}": len(pack(rows, args.max_length, s)) for s in ("in_order", "bfd")}
    theirs = pack_dataset(Dataset.from_dict({"input_ids": [r.input_ids for r in rows]}), args.max_length, "bfd")
    counts["TRL pack_dataset bfd"] = len(theirs)
    lines = [f"{len(rows)} rows, {tokens} tokens, into sequences of at most {args.max_length}:",
             "| packing | sequences | fill |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {n} | {100 * tokens / (n * args.max_length):.1f} % |" for k, n in counts.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", default="default")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def command(mode: str) -> list[str]:
        return [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--max-length",
                str(args.max_length), "--batch", str(args.batch), "--model", args.model]  # fmt: skip

    runs = alternate_in_processes(list(MODES), args.rounds, command, env)
    print(f"\n{args.model}, LoRA r=16, batch {args.batch} sequences of at most {args.max_length} tokens, "
          f"{args.steps} steps; {cpu_name()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| packing | median step (s) | real tokens / s | padding share | peak RSS (MB) |\n|---|---|---|---|---|")
    for mode in MODES:
        r = min(runs[mode], key=lambda x: x["median_step_s"])
        print(f"| {'none' if mode == 'plain' else mode} | {r['median_step_s']:.2f} | {r['real_tokens_per_s']:.0f} | "
              f"{100 * r['padding_share']:.1f} % | {max(x['peak_rss_bytes'] for x in runs[mode]) / 1e6:.0f} |")  # fmt: skip
    print()
    print(sequences_table(args))


if __name__ == "__main__":
    main()
