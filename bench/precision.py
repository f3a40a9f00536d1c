"""What precision costs and gives on the demo task: step time, peak memory, exact match and decode speed.

For each --precisions entry and each --seeds seed, `lorakit train examples/dates.yaml` runs in its own process
(precisions alternate within each seed, so a slow spell of the machine hits all of them): the median step
time from metrics.jsonl, the process's peak RSS, and the held-out exact match after training (200 rows,
greedy). Then the first seed's adapter of each precision decodes --new-tokens greedy tokens for one chat
prompt in that precision (its own process; the median tokens/s of three decodes, the prompt's prefill
subtracted). The step-time comparison with PEFT under the same
autocast is `lorakit bench --precision ...` (lorakit.tools.benchmark).

    .venv/bin/python bench/precision.py [--precisions fp32,bf16-mixed,bf16] [--seeds 0,1,2] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lorakit.fastpath import cpu_description  # noqa: E402
from lorakit.precision import cpu_flags  # noqa: E402

PROMPT = "Write this date as YYYY-MM-DD: the fourth of March, 1961"
SYSTEM = "Write the date as YYYY-MM-DD."
# A `lorakit train` process that reports its own peak RSS on its last line of stderr.
TRAIN_DRIVER = """
import json, sys
from lorakit.cli.main import main
from lorakit.tools.benchmark import peak_rss_bytes
code = main(sys.argv[1:])
print(json.dumps({"peak_rss": peak_rss_bytes()}), file=sys.stderr)
sys.exit(code)
"""


def train_run(precision: str, seed: int, out: Path, steps: int) -> dict:
    """One training run of the demo task; its step times, peak RSS and final exact match."""
    command = [sys.executable, "-c", TRAIN_DRIVER, "train", str(ROOT / "examples" / "dates.yaml"), "--no-progress",
               "--set", f"precision={precision}", "--set", f"seed={seed}", "--set", f"output_dir={out}",
               "--set", "train.eval_before=false", "--set", f"train.max_steps={steps}", "--set", "overwrite=true"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if done.returncode != 0:
        raise ChildProcessError(f"{precision} seed {seed} failed:\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_s = [r["seconds"] for r in records if r["kind"] == "train"][1:]  # the first step warms up
    final = [r for r in records if r["kind"] == "eval"][-1]
    chosen = next((r for r in records if r["kind"] == "run"), {})
    return {
        "precision": precision,
        "resolved": chosen.get("precision", precision),
        "seed": seed,
        "median_step_s": statistics.median(steps_s),
        "peak_rss": json.loads(done.stderr.strip().splitlines()[-1])["peak_rss"],
        "exact_match": final["exact_match"],
    }


DECODE_DRIVER = """
import json, statistics, sys, time
import torch
import lorakit
from lorakit.precision import decide
from lorakit.data import chat_prompt_ids
adapter, precision_name, prompt, system, new_tokens = sys.argv[1:6]
precision = decide(precision_name, "cpu")
model, tokenizer = lorakit.load_model("default", dtype=precision.storage)
lorakit.load_adapter(model, adapter, adapter_dtype="base" if precision.name == "bf16" else None)
model.eval()
ids = torch.tensor([chat_prompt_ids(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": prompt}])])
rates = []
with torch.inference_mode(), precision.context("cpu"):
    for _ in range(3):
        start = time.perf_counter()
        first = model.generate(ids, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=int(new_tokens), min_new_tokens=int(new_tokens), do_sample=False)
        rates.append((out.shape[1] - ids.shape[1] - 1) / (time.perf_counter() - start - prefill))
print(json.dumps({"tokens_per_s": statistics.median(rates)}))
"""


def decode_rate(adapter: Path, precision: str, new_tokens: int) -> float:
    command = [sys.executable, "-c", DECODE_DRIVER, str(adapter), precision, PROMPT, SYSTEM, str(new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if done.returncode != 0:
        raise ChildProcessError(f"decode {precision} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]


def render(runs: list[dict], decode: dict[str, float], args, wall: float) -> str:
    precisions = list(dict.fromkeys(r["precision"] for r in runs))
    by = {p: [r for r in runs if r["precision"] == p] for p in precisions}
    flags = sorted(f for f in cpu_flags() if f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2"))
    lines = [
        f"### Precision on the demo task ({datetime.date.today().isoformat()})",
        "",
        f"Command: `.venv/bin/python bench/precision.py --precisions {args.precisions} --seeds {args.seeds} "
        f"--steps {args.steps}`; machine: {cpu_description()} (flags: {', '.join(flags)}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {wall / 60:.0f} min. Each run: examples/dates.yaml ({args.steps} steps, "
        "batch 8, r 16 all-linear, lr 2e-3), exact match on the 200 held-out rows after training.",
        "",
        "| precision | median step (s) | peak RSS (GB) | exact match per seed | mean exact match | decode tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for p, rs in by.items():
        step = statistics.median(r["median_step_s"] for r in rs)
        peak = statistics.median(r["peak_rss"] for r in rs) / 1e9
        matches = [100 * r["exact_match"] for r in rs]
        rate = f"{decode[p]:.1f}" if p in decode else ""
        lines.append(f"| {p} | {step:.3f} | {peak:.2f} | {' / '.join(f'{m:.1f}' for m in matches)} % | "
                     f"{statistics.mean(matches):.1f} % | {rate} |")  # fmt: skip
    if "fp32" in by:
        base_step = statistics.median(r["median_step_s"] for r in by["fp32"])
        base_peak = statistics.median(r["peak_rss"] for r in by["fp32"])
        base_match = statistics.mean(100 * r["exact_match"] for r in by["fp32"])
        lines.append("")
        for p, rs in by.items():
            if p == "fp32":
                continue
            step = statistics.median(r["median_step_s"] for r in rs) / base_step
            peak = statistics.median(r["peak_rss"] for r in rs) / base_peak
            match = statistics.mean(100 * r["exact_match"] for r in rs) - base_match
            lines.append(f"- {p} against fp32: step time {step:.2f}x, peak RSS {peak:.2f}x, mean exact match "
                         f"{match:+.1f} points.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="fp32,bf16-mixed,bf16")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (the demo's 40)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens for the decode speed")
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    started = time.perf_counter()
    runs, decode = [], {}
    with tempfile.TemporaryDirectory(prefix="lorakit-precision-") as tmp:
        for seed in seeds:
            for p in precisions:
                runs.append(train_run(p, seed, Path(tmp) / f"{p}-{seed}", args.steps))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        for p in precisions:
            decode[p] = decode_rate(Path(tmp) / f"{p}-{seeds[0]}", p, args.new_tokens)
    table = render(runs, decode, args, time.perf_counter() - started)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
