"""Training throughput and memory with and without `data.packing`, on rows of varied lengths.

    .venv/bin/python bench/packing.py [--steps 6] [--max-length 512] [--batch 8] [--model default]

The data: the bundled dates task's chat rows (about 48 tokens each) mixed with one in eight longer rows
(prompt/completion rows that list 6 to 40 dates and their ISO forms, 100 to 500 tokens). `lorakit train` runs
the same number of steps of `--batch` sequences each way (LoRA r=16 on all linear layers, float32, no
evaluation), each in its own process. Reported: the median step time after the first step, the real (non-pad)
tokens per second, the share of padding in the batches the steps saw, and the peak RSS (VmHWM).
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


def worker(args) -> None:
    from lorakit.train import trainer
    from lorakit.train.config import load_config
    from lorakit.train.metrics import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp))
        cfg = load_config(
            None,
            [
                f"model={args.model}", f"output_dir={Path(tmp) / 'out'}", f"data.train={data}",
                f"data.max_length={args.max_length}", f"data.packing={args.mode == 'packed'}", "lora.r=16",
                "lora.alpha=32", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                "train.eval_before=false",
            ],
        )  # fmt: skip
        seen = {"real": 0, "slots": 0}
        step = trainer._Loop._step

        def counting(self, indices):
            rows = [self.rows[i] for i in indices]
            width = max(len(r.input_ids) for r in rows)
            seen["real"] += sum(len(r.input_ids) for r in rows)
            seen["slots"] += width * len(rows)
            return step(self, indices)

        trainer._Loop._step = counting
        trainer.train(cfg, progress=False)
        records = [r for r in read_metrics(Path(tmp) / "out" / "metrics.jsonl") if r["kind"] == "train"]
    median = statistics.median(r["seconds"] for r in records[1:])
    real_per_step = seen["real"] / len(records)
    print(json.dumps({"mode": args.mode, "median_step_s": median, "real_tokens_per_s": real_per_step / median,
                      "padding_share": 1 - seen["real"] / seen["slots"], "peak_rss_bytes": peak_rss_bytes()}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", default="default")
    parser.add_argument("--mode", choices=("plain", "packed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def command(mode: str) -> list[str]:
        return [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--max-length",
                str(args.max_length), "--batch", str(args.batch), "--model", args.model]  # fmt: skip

    runs = alternate_in_processes(["plain", "packed"], args.rounds, command, env)
    print(f"\n{args.model}, LoRA r=16, batch {args.batch} sequences of at most {args.max_length} tokens, "
          f"{args.steps} steps; {cpu_name()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| data.packing | median step (s) | real tokens / s | padding share | peak RSS (MB) |\n|---|---|---|---|---|")
    for mode in ("plain", "packed"):
        r = min(runs[mode], key=lambda x: x["median_step_s"])
        print(f"| {mode == 'packed'} | {r['median_step_s']:.2f} | {r['real_tokens_per_s']:.0f} | "
              f"{100 * r['padding_share']:.1f} % | {max(x['peak_rss_bytes'] for x in runs[mode]) / 1e6:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
