"""Training step and forward cost: lorakit LoRA against PEFT LoRA and full fine-tuning, same model and batch.

Every mode runs in a fresh process (so its peak RSS is its own), the modes alternate, and the whole
cycle repeats; medians are reported with the ratios to PEFT and to full fine-tuning.

Training modes (fused AdamW in every mode, one optimizer step per batch):
  lorakit      lorakit.inject + fuse_forwards + causal_lm_loss (head and cross-entropy fused), as the trainer
  peft         peft.get_peft_model + the model's own loss (model(input_ids, labels=...).loss)
  full         every weight trains, the model's own loss
  lorakit-gc / peft-gc   the same with gradient checkpointing (lorakit-gc under the allocator policy that
               lorakit's trainer uses by default with checkpointing on CPU, as a user of it would get)
  lorakit-lean / peft-lowrss   (not run by default) lorakit or PEFT under the allocator policy that
               lorakit's trainer sets on CPU with train.lean_cpu_memory (lorakit.fastpath): lower RSS, slower
  lorakit-hf-loss   (not run by default) lorakit.inject + the model's own loss, the loop a user writes
               without lorakit.causal_lm_loss
Inference modes (no gradients, logits for the whole batch):
  base, lorakit-unmerged, lorakit-merged, peft-unmerged

    lorakit bench [--rounds 2] [--steps 5] [--batch 8] [--seq 128] [--model DIR] [--markdown FILE]
    lorakit bench --check-loss   # lorakit and PEFT losses over 20 steps agree
    (bench/train_speed.py runs this same program)

Defaults: the embedded SmolLM2-135M-Instruct in float32, r=16, alpha=32, LoRA on q, k, v, o, gate, up and
down projections, no dropout, learning rate 1e-4, batch 8 x 128 random tokens from a fixed seed. PEFT is a
test-time peer, not a lorakit dependency: without it the PEFT modes and the loss check are left out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from ..fastpath import cpu_description

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_MODES = ["lorakit", "peft", "full", "lorakit-gc", "peft-gc"]
EXTRA_MODES = ["lorakit-lean", "peft-lowrss", "lorakit-hf-loss"]
INFER_MODES = ["base", "lorakit-unmerged", "lorakit-merged", "peft-unmerged"]


def build(mode: str, device: str, dtype: torch.dtype, seed: int = 0, model_name: str = "default", targets=None):
    import lorakit
    from lorakit import fastpath

    if mode in ("lorakit-lean", "peft-lowrss", "lorakit-gc") and device == "cpu":
        # what lorakit's trainer does on CPU with train.lean_cpu_memory, by default with gradient checkpointing
        fastpath.return_freed_memory_to_os()

    model, _ = lorakit.load_model(model_name, dtype=dtype)
    model.to(device)
    kind = mode.removesuffix("-gc").removesuffix("-hf-loss").replace("peft-lowrss", "peft")
    kind = kind.replace("lorakit-lean", "lorakit")
    torch.manual_seed(seed)
    if kind.startswith("lorakit"):
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=targets or TARGETS, dropout=0.0))
        lorakit.fuse_forwards(model)  # as lorakit train does (train.fused_forwards)
        _randomize_b(model, seed)
        if kind == "lorakit-merged":
            lorakit.merge(model)
    elif kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=targets or TARGETS, lora_dropout=0.0)
        )
        _randomize_b(model, seed)
    elif kind == "full":
        model.requires_grad_(True)
    if mode.endswith("-gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if kind == "peft":
            model.enable_input_require_grads()
    return model


def _randomize_b(model, seed: int) -> None:
    """B starts at zero in both libraries; give it the same small values so the updates are not trivial."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)


def batch_for(args, vocab: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def loss_fn(mode: str, model, batch):
    if mode.startswith("lorakit") and mode != "lorakit-hf-loss":
        import lorakit

        return lorakit.causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    return model(**batch).loss


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(args) -> dict:
    """One mode in this process: warm-up, then timed steps (or forwards). Prints a JSON line."""
    device = args.device
    dtype = getattr(torch, args.dtype)
    model = build(args.mode, device, dtype, model_name=args.model, targets=_targets(args))
    batch = batch_for(args, model.config.vocab_size, device)
    times = []
    loss_value = None
    if args.mode in INFER_MODES:
        model.eval()
        with torch.inference_mode():
            for i in range(args.steps + 1):
                sync(device)
                start = time.perf_counter()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                sync(device)
                if i:
                    times.append(time.perf_counter() - start)
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        from lorakit.train.trainer import adamw

        opt = adamw(params, lr=1e-4)  # every mode: the fused AdamW of lorakit's trainer and transformers' Trainer
        for i in range(args.steps + 1):
            sync(device)
            start = time.perf_counter()
            loss = loss_fn(args.mode, model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            loss_value = loss.item()
            if i:
                times.append(time.perf_counter() - start)
    peak = peak_rss_bytes()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    return {"mode": args.mode, "times": times, "peak_bytes": peak, "loss": loss_value}


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (or exec'd), in bytes.

    Read from ``VmHWM`` on Linux: ``getrusage``'s ``ru_maxrss`` survives ``exec`` there, so a child spawned by
    a large parent reports at least the parent's resident size at the spawn (measured: a child of an
    800 MB parent reports 792 MB by ``ru_maxrss``, 9 MB by ``VmHWM``). Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def check_loss(args) -> dict:
    """lorakit and PEFT, identical initial weights, 20 AdamW steps: the losses must agree within 1e-4."""
    device = args.device
    batch_args = argparse.Namespace(batch=2, seq=64)
    results = {}
    for mode in ("lorakit", "peft"):
        model = build(mode, device, torch.float32, model_name=args.model, targets=_targets(args))
        model.train()
        batch = batch_for(batch_args, model.config.vocab_size, device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        losses = []
        for _ in range(20):
            loss = loss_fn(mode, model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        results[mode] = losses
        del model
    diff = max(abs(a - b) for a, b in zip(results["lorakit"], results["peft"], strict=True))
    return {"max_abs_loss_diff": diff, "lorakit": results["lorakit"], "peft": results["peft"], "ok": diff <= 1e-4}


def validate(args) -> None:
    """Reject bad options before any model is loaded."""
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(TRAIN_MODES + EXTRA_MODES + INFER_MODES))
    if unknown:
        raise ValueError(f"unknown --modes {unknown}; choose from {','.join(TRAIN_MODES + EXTRA_MODES + INFER_MODES)}")
    if not modes and not args.check_loss:
        raise ValueError("--modes is empty; name at least one mode, e.g. --modes lorakit,peft")
    if args.rounds < 1 or args.steps < 1:
        raise ValueError(f"--rounds and --steps must be at least 1, got {args.rounds} and {args.steps}")
    if args.batch < 1 or args.seq < 2:
        raise ValueError(f"--batch must be at least 1 and --seq at least 2, got {args.batch} and {args.seq}")


def orchestrate(args) -> dict:
    validate(args)
    modes = [m for m in args.modes.split(",") if m]
    if not _have_peft():
        dropped = [m for m in modes if m.startswith("peft")]
        modes = [m for m in modes if not m.startswith("peft")]
        if dropped:
            print(f"PEFT is not installed: leaving out {', '.join(dropped)} (pip install peft)", file=sys.stderr)

    def command(mode: str) -> list[str]:
        cmd = [sys.executable, "-m", "lorakit.tools.benchmark", "--mode", mode, "--steps", str(args.steps)]
        cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device, "--dtype", args.dtype]
        return [*cmd, "--model", args.model, "--targets", args.targets]

    runs = alternate_in_processes(modes, args.rounds, command, _child_env())
    summary = {}
    for mode, results in runs.items():
        times = [t for res in results for t in res["times"]]
        summary[mode] = {
            "median_s": statistics.median(times),
            "tokens_per_s": args.batch * args.seq / statistics.median(times),
            "peak_gb": statistics.median(res["peak_bytes"] for res in results) / 1e9,
            "times": times,
        }
    return summary


def alternate_in_processes(modes: list[str], rounds: int, command, env: dict[str, str]) -> dict[str, list[dict]]:
    """Run ``command(mode)`` in a fresh process per mode and round, the order reversed every other round;
    each process prints its result as JSON on its last line. Returns every mode's results, round by round.

    Raises:
        ChildProcessError: a mode's process failed (its stderr's end is in the message).
    """
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            print(f"round {r + 1}/{rounds}: {mode}", file=sys.stderr, flush=True)
            out = subprocess.run(command(mode), capture_output=True, text=True, check=False, env=env)
            if out.returncode != 0:
                raise ChildProcessError(f"benchmark mode {mode} failed:\n{out.stderr[-3000:]}")
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def render(summary: dict, args, check: dict | None) -> str:
    def ratio(a, b, key):
        return summary[a][key] / summary[b][key] if a in summary and b in summary else None

    machine = f"{cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if args.device.startswith("cuda"):
        machine = torch.cuda.get_device_name() + f", torch {torch.__version__}"
    lines = [
        f"\n### Training and forward cost, {args.device}, {args.dtype}, batch {args.batch} x {args.seq} ({datetime.date.today()})\n",
        f"Command: `lorakit bench --rounds {args.rounds} --steps {args.steps} --batch {args.batch} "
        f"--seq {args.seq} --device {args.device} --dtype {args.dtype}{_model_flags(args)}`; machine: {machine}.\n",
        "| mode | median step or forward (s) | tokens/s | peak memory (GB) | time vs PEFT | time vs full | memory vs PEFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, s in summary.items():
        peft_ref = "peft-gc" if mode.endswith("-gc") else ("peft-unmerged" if mode in INFER_MODES else "peft")
        vs_peft = ratio(mode, peft_ref, "median_s")
        vs_full = (
            ratio(mode, "full", "median_s") if mode in TRAIN_MODES + EXTRA_MODES else ratio(mode, "base", "median_s")
        )
        mem = ratio(mode, "peft", "peak_gb") if mode in TRAIN_MODES + EXTRA_MODES else None
        lines.append(
            f"| {mode} | {s['median_s']:.3f} | {s['tokens_per_s']:.0f} | {s['peak_gb']:.2f} | {_times(vs_peft)} | "
            f"{_times(vs_full)} | {_times(mem)} |"
        )
    lines.append("")
    lines.append("For inference modes the 'time vs full' column is the ratio to the base model's forward.")
    if check is not None:
        lines.append(
            f"Same maths: lorakit and PEFT from identical weights, 20 AdamW steps (batch 2 x 64): largest loss "
            f"difference {check['max_abs_loss_diff']:.2e} ({'within' if check['ok'] else 'OUTSIDE'} 1e-4)."
        )
    return "\n".join(lines) + "\n"


def _times(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else ""


def _targets(args) -> list[str]:
    return [t for t in args.targets.split(",") if t]


def _model_flags(args) -> str:
    flags = "" if args.model == "default" else f" --model {args.model}"
    flags += "" if _targets(args) == TARGETS else f" --targets {args.targets}"
    return flags + ("" if args.modes == ",".join(TRAIN_MODES + INFER_MODES) else f" --modes {args.modes}")


def _have_peft() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def _child_env() -> dict[str, str]:
    """The child processes import this module by name: make sure they find the same lorakit."""
    import lorakit

    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(lorakit.__file__)))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    parser.add_argument(
        "--modes", default=",".join(TRAIN_MODES + INFER_MODES), help="comma-separated modes (see the description)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="times the whole cycle of modes repeats")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode and round, after one warm-up")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--model", default="default", help="causal LM: HF directory, .gguf file or 'default'")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated LoRA target module names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--check-loss", action="store_true", help="only check lorakit and PEFT losses agree")
    parser.add_argument("--skip-check", action="store_true", help="leave out the loss check")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--markdown", help="append the result table to this file")


def run(args: argparse.Namespace) -> int:
    if args.mode:
        print(json.dumps(run_mode(args)))
        return 0
    validate(args)
    if args.check_loss:
        if not _have_peft():
            raise ValueError("--check-loss compares with PEFT, which is not installed (pip install peft)")
        result = check_loss(args)
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    check = None if args.skip_check or not _have_peft() else check_loss(args)
    summary = orchestrate(args)
    table = render(summary, args, check)
    print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": summary, "check": check}, fh, indent=2)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(table)
    return 0 if check is None or check["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, ChildProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
