"""The serving engine's decode step in process: the engine's own step (``serve.step``) against the model's forward.

    .venv/bin/python bench/engine_step.py --adapter out/dates [--rows 1,8] [--weights int8,precision]
        [--precision bf16-mixed] [--steps 40] [--repeats 2] [--profile]

Loads the embedded model as ``lorakit serve`` does (the precision's storage dtype, the adapter in its trained dtype,
then ``--weights``), loads the adapter under eight names (d0 ... d7), prefills the first N chat prompts of the demo
task (examples/data/dates-eval.jsonl), row i on adapter di, and times ``Engine._decode`` (one token for every row:
the forward, sampling, detokenizing) for --steps steps, the first 5 left out; median per step. Each weight mode is
one model; for each, the two decode paths (``fast_step=True``: the engine's own step, ``False``: the model's
forward under ``lorakit.route``) alternate over --repeats. --profile adds torch.profiler's table of the engine's
own step (10 steps) for each row count. No HTTP: ``bench/serve_speed.py`` measures the server.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lorakit  # noqa: E402
from lorakit.cli.weights_option import apply_weights  # noqa: E402
from lorakit.fastpath import cpu_description  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.precision import decide  # noqa: E402
from lorakit.serve.engine import Engine, Request, SamplingParams  # noqa: E402

DATA = ROOT / "examples" / "data" / "dates-eval.jsonl"


def prompts(tokenizer, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    texts = [
        tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False) for r in rows
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def time_steps(model, tokenizer, precision, rows: int, fast: bool, steps: int, profile: bool = False):
    engine = Engine(model, tokenizer, precision=precision, fast_step=fast, max_batch_size=max(rows, 1))
    for i, ids in enumerate(prompts(tokenizer, rows)):
        engine.submit(Request(ids, f"d{i}", SamplingParams(max_tokens=steps + 30, ignore_eos=True), lambda e: None))
    times = []
    with torch.inference_mode():
        engine._prefill(engine._admit())
        for _ in range(steps):
            start = time.perf_counter()
            engine._decode()
            times.append(time.perf_counter() - start)
        table = None
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    engine._decode()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    path = engine.decode_path
    engine.stop()
    return 1000 * statistics.median(times[5:]), path, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the demo adapter's directory (make demo: out/dates)")
    parser.add_argument("--rows", default="1,8", help="comma-separated row counts (at most 8)")
    parser.add_argument("--weights", default="int8,precision", help="comma-separated --weights modes")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    precision = decide(args.precision, "cpu")
    print(f"### The engine's decode step in process ({datetime.date.today()})\n")
    print(f"Command: `.venv/bin/python bench/engine_step.py {' '.join(sys.argv[1:])}`; {cpu_description()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; precision {precision.name}; median ms per "
          f"step of {args.steps} (first 5 left out), {args.repeats} repeats with the paths alternated.\n")  # fmt: skip
    lines = [
        "| weights | rows (adapters) | engine's own step (ms) | model's forward (ms) | ratio |",
        "|---|---|---|---|---|",
    ]
    for weights in args.weights.split(","):
        model, tokenizer = load_model("default", dtype=precision.storage)
        for i in range(8):
            lorakit.load_adapter(model, args.adapter, f"d{i}", adapter_dtype=precision.trained)
        chosen = apply_weights(model, weights, "cpu", precision)
        print(f"- {weights}: {chosen}", flush=True)
        for rows in rows_list:
            results: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeats):
                for fast in (True, False):
                    ms, path, _ = time_steps(model, tokenizer, precision, rows, fast, args.steps)
                    results[fast].append(ms)
            own, forward = statistics.median(results[True]), statistics.median(results[False])
            lines.append(f"| {weights} | {rows} ({rows}) | {own:.1f} | {forward:.1f} | {own / forward:.2f}x |")
            if args.profile:
                _, path, table = time_steps(model, tokenizer, precision, rows, True, 10, profile=True)
                print(f"\nprofile, {weights}, {rows} rows ({path}):\n{table}", flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
