"""DPO step time and peak memory: lorakit against TRL's DPOTrainer with a PEFT LoRA, same model, data and batch.

    .venv/bin/python bench/dpo_speed.py [--steps 12] [--batch 8] [--rounds 2] [--model default]

Both train the same LoRA (r=16, alpha=32, every linear layer of the embedded SmolLM2-135M-Instruct, float32,
no dropout) with DPO (sigmoid loss, beta 0.1, AdamW at a constant 1e-4, max length 64) on the bundled
preference pairs (examples/make_preferences.py), batch ``--batch`` pairs, no gradient checkpointing, no
evaluation (TRL's default gradient checkpointing turned off). In both the reference is the base model with the adapter switched off, computed at every step.
Each run is its own process (the order alternates between rounds); each reports the median step time after
the first two steps and its peak resident memory (VmHWM: model, optimizer state, activations, libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "examples"))

from lorakit.tools.benchmark import alternate_in_processes, peak_rss_bytes  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _data(directory: Path) -> Path:
    import make_preferences

    train, _ = make_preferences.write(directory)
    return train


def run_lorakit(args, data: Path, out: Path) -> dict:
    from lorakit.train.config import load_config
    from lorakit.train.metrics import read_metrics
    from lorakit.train.trainer import train

    cfg = load_config(
        None,
        [
            f"model={args.model}", "objective=dpo", f"output_dir={out}", f"data.train={data}", "data.max_length=64",
            "lora.r=16", "lora.alpha=32", "lora.target_modules=all-linear", "dpo.beta=0.1",
            f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", "train.lr=1e-4",
            "train.scheduler=constant", "train.eval_before=false", "train.max_grad_norm=1.0",
        ],
    )  # fmt: skip
    train(cfg, progress=False)
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    return {"step_seconds": [r["seconds"] for r in records], "loss": [r["loss"] for r in records]}


def run_trl(args, data: Path, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lorakit.data import read_rows
    from lorakit.models import load_model

    rows = [
        {
            "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for _, r in read_rows(data)
    ]
    model, tokenizer = load_model(args.model)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.started = 0.0

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.started)

    clock = Clock()
    config = DPOConfig(
        output_dir=str(out), beta=0.1, loss_type=["sigmoid"], per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0, max_length=64,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, seed=0, gradient_checkpointing=False,
    )  # fmt: skip
    if args.trl_chunk:  # diagnosis: the vocabulary chunk of TRL's fused log-prob kernel (default 32768)
        import trl.trainer.utils

        trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE = args.trl_chunk
    trainer = DPOTrainer(
        model=peft_model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_seconds": clock.times, "loss": losses}


def worker(args) -> None:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(Path(tmp) / "data")
        result = (run_lorakit if args.mode == "lorakit" else run_trl)(args, data, Path(tmp) / "out")
    steps = result["step_seconds"][2:]
    print(json.dumps({"mode": args.mode, "median_step_s": statistics.median(steps), "peak_rss_bytes": peak_rss_bytes(),
                      "first_loss": result["loss"][0], "steps": len(result["step_seconds"])}))  # fmt: skip


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--trl-chunk", type=int, help="vocabulary chunk of TRL's fused log-prob kernel (default: TRL's)"
    )
    parser.add_argument("--mode", choices=("lorakit", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error(f"--steps {args.steps}: use at least 4 (the first two steps are not timed)")
    if args.mode:
        worker(args)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def command(mode: str) -> list[str]:
        chunk = ["--trl-chunk", str(args.trl_chunk)] if args.trl_chunk else []
        return [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--batch", str(args.batch),
                "--model", args.model, *chunk]  # fmt: skip

    runs = alternate_in_processes(["lorakit", "trl"], args.rounds, command, env)
    best = {m: min(r["median_step_s"] for r in rs) for m, rs in runs.items()}
    peak = {m: max(r["peak_rss_bytes"] for r in rs) for m, rs in runs.items()}
    print(f"\nDPO, {args.model}, LoRA r=16 all linear layers, batch {args.batch} pairs, max length 64, float32; "
          f"{cpu_name()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| | median step (s) | peak RSS (MB) | first-step loss |\n|---|---|---|---|")
    for mode, label in (("lorakit", "lorakit"), ("trl", "TRL DPOTrainer + PEFT")):
        print(f"| {label} | {best[mode]:.2f} | {peak[mode] / 1e6:.0f} | {runs[mode][0]['first_loss']:.4f} |")
    print(f"| lorakit / TRL | {best['lorakit'] / best['trl']:.2f}x | {peak['lorakit'] / peak['trl']:.2f}x | |")


if __name__ == "__main__":
    main()
