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

Precisions (``--precision``, comma-separated: every mode runs in each, all alternated in one run):
  fp32         everything float32
  bf16-mixed   the frozen base stored in bfloat16, adapters (lorakit's default; PEFT's
               ``autocast_adapter_dtype=True``) and optimizer state float32, forward under ``torch.autocast``;
               ``full`` keeps its float32 weights and computes under autocast (classic AMP)
  bf16         everything bfloat16 (lorakit's ``adapter_dtype="base"``, PEFT's ``autocast_adapter_dtype=False``)
  fp16-mixed   as bf16-mixed in float16 with a GradScaler (CUDA only)
  auto         (the default) what ``lorakit train`` would pick here: bf16-mixed where the hardware multiplies
               bf16 natively, fp32 elsewhere
With several precisions the rows are named ``MODE PRECISION`` and compared with the same mode in fp32.
``--dtype float32`` / ``bfloat16`` (the former option) mean ``--precision fp32`` / ``bf16``.

    lorakit bench [--rounds 2] [--steps 5] [--batch 8] [--seq 128] [--model ID|DIR] [--markdown FILE]
    lorakit bench --modes lorakit,peft --precision fp32,bf16-mixed,bf16
    lorakit bench --check-loss   # lorakit and PEFT losses over 20 steps agree (float32)
    (bench/train_speed.py runs this same program)

Defaults: the embedded SmolLM2-135M-Instruct in precision auto, r=16, alpha=32, LoRA on q, k, v, o, gate, up
and down projections, no dropout, learning rate 1e-4, batch 8 x 128 random tokens from a fixed seed. PEFT is a
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
from ..precision import PRECISIONS, Precision, decide

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_MODES = ["lorakit", "peft", "full", "lorakit-gc", "peft-gc"]
EXTRA_MODES = ["lorakit-lean", "peft-lowrss", "lorakit-hf-loss"]
INFER_MODES = ["base", "lorakit-unmerged", "lorakit-merged", "peft-unmerged"]
DTYPE_PRECISIONS = {"float32": "fp32", "bfloat16": "bf16"}  # the former --dtype, as the precision it meant
FP32 = decide("fp32", "cpu")


def build(
    mode: str, device: str, precision: Precision = FP32, seed: int = 0, model_name: str = "default", targets=None
):
    import lorakit
    from lorakit import fastpath

    if mode in ("lorakit-lean", "peft-lowrss", "lorakit-gc") and device == "cpu":
        # what lorakit's trainer does on CPU with train.lean_cpu_memory, by default with gradient checkpointing
        fastpath.return_freed_memory_to_os()

    kind = mode.removesuffix("-gc").removesuffix("-hf-loss").replace("peft-lowrss", "peft")
    kind = kind.replace("lorakit-lean", "lorakit")
    # full fine-tuning trains every weight: they are kept in the trained dtype (float32 under a mixed precision)
    model, _ = lorakit.load_model(model_name, dtype=precision.trained if kind == "full" else precision.storage)
    model.to(device)
    torch.manual_seed(seed)
    if kind.startswith("lorakit"):
        lora = lorakit.LoraConfig(r=16, alpha=32, target_modules=targets or TARGETS, dropout=0.0)
        lorakit.inject(model, lora, adapter_dtype=precision.trained)  # float32 under the mixed precisions
        lorakit.fuse_forwards(model)  # as lorakit train does (train.fused_forwards)
        _randomize_b(model, seed)
        if kind == "lorakit-merged":
            lorakit.merge(model)
    elif kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=16, lora_alpha=32, target_modules=targets or TARGETS, lora_dropout=0.0),
            autocast_adapter_dtype=precision.trained == torch.float32,  # PEFT's float32 adapters over bf16
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


def loss_fn(mode: str, model, batch, precision: Precision = FP32):
    """The training loss of ``mode``, its forward under ``precision``'s autocast (the backward runs outside)."""
    with precision.context(batch["input_ids"].device):
        if mode.startswith("lorakit") and mode != "lorakit-hf-loss":
            import lorakit

            return lorakit.causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        return model(**batch).loss


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(args) -> dict:
    """One mode in one precision in this process: warm-up, then timed steps (or forwards). Prints a JSON line."""
    device = args.device
    precision = decide(args.precision or "auto", device)
    model = build(args.mode, device, precision, model_name=args.model, targets=_targets(args))
    batch = batch_for(args, model.config.vocab_size, device)
    if args.mode in INFER_MODES:
        times, loss_value = _forwards(model, batch, args.steps, precision), None
    else:
        times, loss_value = _train_steps(args.mode, model, batch, args.steps, precision)
    peak = peak_rss_bytes()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    return {"mode": args.mode, "precision": precision.name, "times": times, "peak_bytes": peak, "loss": loss_value}


def _forwards(model, batch, steps: int, precision: Precision) -> list[float]:
    """Seconds of each of ``steps`` forwards after a warm-up, under ``precision``'s autocast."""
    device = str(batch["input_ids"].device)
    model.eval()
    times = []
    with torch.inference_mode(), precision.context(device):
        for i in range(steps + 1):
            sync(device)
            start = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            sync(device)
            if i:
                times.append(time.perf_counter() - start)
    return times


def _train_steps(mode: str, model, batch, steps: int, precision: Precision) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` optimizer steps after a warm-up, and the last loss. Every mode uses the
    fused AdamW of lorakit's trainer and transformers' Trainer; fp16-mixed scales the loss (GradScaler)."""
    from lorakit.train.optim import adamw

    device = str(batch["input_ids"].device)
    model.train()
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(torch.device(device).type) if precision.scaled else None
    times, loss_value = [], float("nan")
    for i in range(steps + 1):
        sync(device)
        start = time.perf_counter()
        loss = loss_fn(mode, model, batch, precision)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        sync(device)
        loss_value = loss.item()
        if i:
            times.append(time.perf_counter() - start)
    return times, loss_value


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
        model = build(mode, device, FP32, model_name=args.model, targets=_targets(args))
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


def resolve_precisions(args) -> list[str]:
    """The precisions to measure, each resolved on --device (``auto`` by the hardware) and announced on stderr,
    without repeats. The former --dtype names one.

    Raises:
        ValueError: an unknown precision, one the device lacks, or --dtype float16 (with the fix).
    """
    names = _precision_names(args)
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown or not names:
        raise ValueError(
            f"unknown --precision {unknown or names}; choose from {','.join(PRECISIONS)} (comma-separated)"
        )
    resolved: dict[str, Precision] = {}
    for name in names:
        precision = decide(name, args.device)
        resolved.setdefault(precision.name, precision)
    for precision in resolved.values():
        print(precision.describe(), file=sys.stderr)
    return list(resolved)


def _precision_names(args) -> list[str]:
    if args.dtype is None:
        return [n for n in (args.precision or "auto").split(",") if n]
    if args.precision is not None:
        raise ValueError("--dtype is the former spelling of --precision: give --precision only")
    if args.dtype not in DTYPE_PRECISIONS:
        raise ValueError(
            f"--dtype {args.dtype} (pure float16 without loss scaling) is not measured any more: use --precision "
            "fp16-mixed on a CUDA device"
        )
    print(f"--dtype {args.dtype} means --precision {DTYPE_PRECISIONS[args.dtype]}", file=sys.stderr)
    return [DTYPE_PRECISIONS[args.dtype]]


def _label(mode: str, precision: str, precisions: list[str]) -> str:
    """A row's name: the mode, followed by its precision when the bench measures several."""
    return mode if len(precisions) == 1 else f"{mode} {precision}"


def orchestrate(args, precisions: list[str]) -> dict:
    """Every mode in every precision (resolved names), alternated in fresh processes; their medians."""
    validate(args)
    modes = [m for m in args.modes.split(",") if m]
    if not _have_peft():
        dropped = [m for m in modes if m.startswith("peft")]
        modes = [m for m in modes if not m.startswith("peft")]
        if dropped:
            print(f"PEFT is not installed: leaving out {', '.join(dropped)} (pip install peft)", file=sys.stderr)
    rows = {_label(m, p, precisions): (m, p) for m in modes for p in precisions}

    def command(label: str) -> list[str]:
        mode, precision = rows[label]
        cmd = [sys.executable, "-m", "lorakit.tools.benchmark", "--mode", mode, "--steps", str(args.steps)]
        cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device, "--precision", precision]
        return [*cmd, "--model", args.model, "--targets", args.targets]

    runs = alternate_in_processes(list(rows), args.rounds, command, _child_env())
    summary = {}
    for label, results in runs.items():
        times = [t for res in results for t in res["times"]]
        summary[label] = {
            "mode": rows[label][0],
            "precision": rows[label][1],
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


def render(summary: dict, args, check: dict | None, precisions: list[str]) -> str:
    """The markdown table: every row against PEFT and full fine-tuning (or the base's forward) in the same
    precision and, when fp32 is among several precisions, against the same mode in fp32."""
    against_fp32 = len(precisions) > 1 and "fp32" in precisions
    machine = f"{cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if args.device.startswith("cuda"):
        machine = torch.cuda.get_device_name() + f", torch {torch.__version__}"
    lines = [
        f"\n### Training and forward cost, {args.device}, {', '.join(precisions)}, batch {args.batch} x {args.seq} ({datetime.date.today()})\n",
        f"Command: `lorakit bench --rounds {args.rounds} --steps {args.steps} --batch {args.batch} --seq {args.seq} "
        f"--device {args.device} --precision {','.join(precisions)}{_model_flags(args)}`; machine: {machine}.\n",
        "| mode | median step or forward (s) | tokens/s | peak memory (GB) | time vs PEFT | time vs full | memory vs PEFT |"
        + (" time vs fp32 | memory vs fp32 |" if against_fp32 else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if against_fp32 else ""),
    ]
    lines += [_row(label, summary, precisions, against_fp32) for label in summary]
    lines.append("")
    lines.append("For inference modes the 'time vs full' column is the ratio to the base model's forward.")
    if len(precisions) > 1:
        lines.append("Each row is compared with PEFT, full fine-tuning and the base in its own precision.")
    if check is not None:
        lines.append(
            f"Same maths: lorakit and PEFT from identical weights, 20 AdamW steps (batch 2 x 64, float32): largest "
            f"loss difference {check['max_abs_loss_diff']:.2e} ({'within' if check['ok'] else 'OUTSIDE'} 1e-4)."
        )
    return "\n".join(lines) + "\n"


def _row(label: str, summary: dict, precisions: list[str], against_fp32: bool) -> str:
    """One table row; its ratios are to rows in the same precision, and to the same mode's fp32 row."""
    s = summary[label]
    mode, training = s["mode"], s["mode"] in TRAIN_MODES + EXTRA_MODES

    def ratio(other_mode: str, key: str, precision: str = s["precision"]) -> str:
        other = _label(other_mode, precision, precisions)
        return _times(s[key] / summary[other][key] if other in summary else None)

    peft_ref = "peft-gc" if mode.endswith("-gc") else ("peft-unmerged" if mode in INFER_MODES else "peft")
    row = (
        f"| {label} | {s['median_s']:.3f} | {s['tokens_per_s']:.0f} | {s['peak_gb']:.2f} | "
        f"{ratio(peft_ref, 'median_s')} | {ratio('full' if training else 'base', 'median_s')} | "
        f"{ratio('peft', 'peak_gb') if training else ''} |"
    )
    if against_fp32:
        row += f" {ratio(mode, 'median_s', 'fp32')} | {ratio(mode, 'peak_gb', 'fp32')} |"
    return row


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
    parser.add_argument(
        "--model",
        default="default",
        help="causal LM: a Hugging Face Hub id (org/name[@revision]), a local model directory or .gguf file, or "
        "'default' (the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated LoRA target module names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        help="comma-separated precisions, each mode runs in each: fp32, bf16-mixed, bf16, fp16-mixed (CUDA), auto "
        "(default: what lorakit train picks here)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the former option: float32 is --precision fp32, bfloat16 is --precision bf16",
    )
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
    precisions = resolve_precisions(args)
    check = None if args.skip_check or not _have_peft() else check_loss(args)
    summary = orchestrate(args, precisions)
    table = render(summary, args, check, precisions)
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
