"""Cost of the LoRA variants on the embedded model: DoRA's unmerged forward against plain LoRA's, and QLoRA's
memory and step time against plain LoRA.

Each mode runs in a fresh process (its peak RSS is its own); modes alternate over --rounds; medians reported.

  forward modes (eval, no gradients, batch x seq tokens):  lora-unmerged, dora-unmerged, peft-dora-unmerged
  training modes (AdamW step, lorakit's loss):             lora-train, lora-lean-train, qlora-nf4-train,
                                                           qlora-int8-train, dora-train
  peft-dora-train: PEFT's DoRA on the same model, the step a PEFT user writes (AdamW, the model's own loss)
  QLoRA modes run under the allocator policy lorakit's trainer sets with `quantize` on CPU (lorakit.fastpath);
  lora-lean-train is plain LoRA under that same policy, for a like-for-like memory comparison.

    .venv/bin/python bench/variants.py [--rounds 3] [--steps 3] [--batch 8] [--seq 128] [--markdown FILE]

r = 16, alpha = 32, q/k/v/o/gate/up/down projections, float32 compute, random B so updates are not zero.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from lorakit.fastpath import cpu_description

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FORWARD_MODES = ["lora-unmerged", "dora-unmerged", "peft-dora-unmerged"]
TRAIN_MODES = ["lora-train", "lora-lean-train", "qlora-nf4-train", "qlora-int8-train", "dora-train", "peft-dora-train"]


def build(mode: str):
    import lorakit
    from lorakit.fastpath import return_freed_memory_to_os

    if mode.startswith("qlora") or "lean" in mode:
        return_freed_memory_to_os()  # what the trainer does on CPU with quantize or train.lean_cpu_memory

    model, _ = lorakit.load_model("default", dtype=torch.float32)
    report = None
    if mode.startswith("qlora"):
        from lorakit.quant import quantize

        report = quantize(model, mode.split("-")[1])
    torch.manual_seed(0)
    if mode.startswith("peft"):
        import peft

        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=True)
        model = peft.get_peft_model(model, config)
    else:
        config = lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS, use_dora="dora" in mode)
        lorakit.inject(model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    return model, report


def run_mode(args) -> dict:
    model, report = build(args.mode)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times = []
    if args.mode in FORWARD_MODES:
        model.eval()
        with torch.inference_mode():
            for i in range(args.steps + 1):
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=batch["attention_mask"])
                if i:
                    times.append(time.perf_counter() - start)
    else:
        from lorakit.train.tasks import CausalLM

        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for i in range(args.steps + 1):
            start = time.perf_counter()
            if args.mode.startswith("peft"):
                loss = model(**batch).loss
            else:
                loss = CausalLM().train_loss_sum(model, batch) / ids[:, 1:].numel()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - start)
    from lorakit.tools.benchmark import peak_rss_bytes

    peak = peak_rss_bytes()
    out = {"mode": args.mode, "times": times, "peak_rss": peak}
    if report is not None:
        out["linear_bytes_before"] = report.bytes_before
        out["linear_bytes_after"] = report.bytes_after
    return out


def orchestrate(args) -> dict:
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(FORWARD_MODES + TRAIN_MODES))
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; choose from {','.join(FORWARD_MODES + TRAIN_MODES)}")

    def command(mode: str) -> list[str]:
        return [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--batch", str(args.batch),
                "--seq", str(args.seq)]  # fmt: skip

    from lorakit.tools.benchmark import alternate_in_processes

    runs = alternate_in_processes(modes, args.rounds, command, dict(os.environ))
    summary = {}
    for mode, results in runs.items():
        times = [t for res in results for t in res["times"]]
        summary[mode] = {
            "median_s": statistics.median(times),
            "peak_rss_gb": statistics.median(res["peak_rss"] for res in results) / 1e9,
            **{k: results[0][k] for k in ("linear_bytes_before", "linear_bytes_after") if k in results[0]},
        }
    return summary


def render(summary: dict, args) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        f"### LoRA variants, cpu, float32, batch {args.batch} x {args.seq} ({today})",
        "",
        f"Command: `.venv/bin/python bench/variants.py --modes {','.join(summary)} --rounds {args.rounds} "
        f"--steps {args.steps} "
        f"--batch {args.batch} --seq {args.seq}`; machine: {cpu_description()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| mode | median step or forward (s) | peak RSS (GB) | linear weights (MB) |",
        "|---|---|---|---|",
    ]
    for mode, s in summary.items():
        weights = ""
        if "linear_bytes_after" in s:
            before, after = s["linear_bytes_before"], s["linear_bytes_after"]
            weights = f"{after / 1e6:.1f} (float32: {before / 1e6:.1f}, {before / after:.2f}x smaller)"
        lines.append(f"| {mode} | {s['median_s']:.3f} | {s['peak_rss_gb']:.2f} | {weights} |")
    lines.append("")
    if "lora-unmerged" in summary and "dora-unmerged" in summary:
        ratio = summary["dora-unmerged"]["median_s"] / summary["lora-unmerged"]["median_s"]
        lines.append(f"- DoRA unmerged forward / plain LoRA unmerged: **{ratio:.2f}x** (required <= 1.2x).")
    for mode in ("dora-unmerged", "dora-train"):
        peer = f"peft-{mode}"
        if mode in summary and peer in summary:
            t = summary[peer]["median_s"] / summary[mode]["median_s"]
            m = summary[mode]["peak_rss_gb"] / summary[peer]["peak_rss_gb"]
            lines.append(f"- {mode}: lorakit {t:.2f}x the speed of PEFT, peak RSS {m:.2f}x PEFT's.")
    for mode in ("qlora-nf4-train", "qlora-int8-train"):
        for plain in ("lora-lean-train", "lora-train"):
            if mode in summary and plain in summary:
                t = summary[mode]["median_s"] / summary[plain]["median_s"]
                m = summary[mode]["peak_rss_gb"] / summary[plain]["peak_rss_gb"]
                lines.append(f"- {mode} against {plain}: step time {t:.2f}x, peak RSS {m:.2f}x.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--modes", default=",".join(FORWARD_MODES + TRAIN_MODES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return 0
    try:
        summary = orchestrate(args)
    except ChildProcessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    table = render(summary, args)
    print(table)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
