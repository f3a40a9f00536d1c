"""QLoRA on a big model: peak memory and time of loading it quantized, lorakit against transformers + bitsandbytes,
and a short `lorakit train` run with `quantize: nf4` and otherwise default settings.

The bench writes its own random-weight LLaMA-shaped model (bf16 safetensors in 4 GB shards, the embedded
model's tokenizer; 13 GB for the 7B shape, 26 GB for 13B) unless the directory already holds one. Each
measurement runs in its own process, which reports its peak RSS (VmHWM):

  lorakit      lorakit.quant.load_quantized(dir, "nf4", dtype=bf16): quantized while loading, a tensor at a time
  transformers AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit,
               nf4, double quantization, bf16 compute), dtype=bf16): transformers' own 4-bit loading path
  train        lorakit train examples/dates.yaml with quantize nf4, --steps steps of batch 2, no evaluation

    .venv/bin/python bench/qlora_load.py --shape 7b --dir /tmp/llama-7b-shaped [--steps 2] [--markdown FILE]
    .venv/bin/python bench/qlora_load.py --shape 1b --dir /tmp/llama-1b-shaped   # a quick check (2 GB)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ stays off the path: no script here may shadow an installed package (a kernels.py once hid `kernels`)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {  # hidden, intermediate, layers, heads (vocab 49152: the embedded tokenizer's)
    "1b": (2048, 5632, 22, 32),
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
}
SHARD_BYTES = 4 << 30
PEAK = "import resource; print('PEAK', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"

LORAKIT = """
import time, torch
from lorakit.quant import load_quantized
start = time.perf_counter()
model, _, report = load_quantized({dir!r}, "nf4", dtype=torch.bfloat16)
print("SECONDS", time.perf_counter() - start)
print("REPORT", report.describe())
"""
TRANSFORMERS = """
import time, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
start = time.perf_counter()
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained({dir!r}, quantization_config=config, dtype=torch.bfloat16)
print("SECONDS", time.perf_counter() - start)
"""
TRAIN = """
import sys, time
from lorakit.cli.main import main
start = time.perf_counter()
code = main(["train", {config!r}, "--set", "model={dir}", "--set", "quantize=nf4", "--set", "output_dir={out}",
             "--set", "train.max_steps={steps}", "--set", "train.batch_size=2", "--set", "data.eval=null",
             "--no-progress"])
print("SECONDS", time.perf_counter() - start)
import json, pathlib, statistics
steps = [json.loads(line) for line in pathlib.Path({out!r}, "metrics.jsonl").read_text().splitlines()]
steps = [s for s in steps if s.get("kind") == "train"]
if steps:
    print("REPORT", f"median step {{statistics.median(s['seconds'] for s in steps):.1f}} s "
          f"({{steps[-1]['tokens']}} tokens a step)")
if code:
    sys.exit(code)
"""


def write_model(directory: Path, shape: str) -> float:
    """A random-weight LLaMA of ``shape`` in bf16 safetensors shards, with the embedded tokenizer; GB written."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models import resolve_model_dir

    hidden, inter, layers, heads = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )  # fmt: skip
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    for source in resolve_model_dir("default").iterdir():  # the tokenizer and its chat template
        if source.suffix != ".safetensors" and source.name not in ("config.json", "lorakit-manifest.json"):
            shutil.copy(source, tmp / source.name)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    weight_map = {}
    names = [(n, p.shape) for n, p in skeleton.named_parameters()]
    for i, (name, shp) in enumerate(names):
        if name.endswith("norm.weight"):
            tensor = torch.ones(shp, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shp, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if size + nbytes > SHARD_BYTES and shards[-1]:
            _save(shards, tmp, weight_map, save_file)
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
        total += nbytes
        if (i + 1) % 32 == 0 or i + 1 == len(names):
            print(f"writing {shape}-shaped model: {i + 1}/{len(names)} tensors", file=sys.stderr)
    _save(shards, tmp, weight_map, save_file)
    count = len(shards)
    final = {}
    for k, (index, _) in weight_map.items():
        final[k] = f"model-{index:05d}-of-{count:05d}.safetensors"
    for index in range(1, count + 1):
        (tmp / f"shard-{index}.safetensors").rename(tmp / f"model-{index:05d}-of-{count:05d}.safetensors")
    index_file = {"metadata": {"total_size": total}, "weight_map": final}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    tmp.rename(directory)
    return total / 1e9


def _save(shards, tmp: Path, weight_map: dict, save_file) -> None:
    index = len(shards)
    save_file(shards[-1], str(tmp / f"shard-{index}.safetensors"), metadata={"format": "pt"})
    for key in shards[-1]:
        weight_map[key] = (index, None)
    shards[-1].clear()  # the tensors of a written shard are not kept


def run(code: str, label: str) -> dict:
    """Run ``code`` in a fresh Python; its seconds, peak RSS (GB) and report line."""
    print(f"measuring: {label}", file=sys.stderr)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code + "\n" + PEAK], capture_output=True, text=True, env=env, cwd=ROOT)
    out = {"label": label, "ok": proc.returncode == 0}
    for line in proc.stdout.splitlines():
        if line.startswith("SECONDS"):
            out["seconds"] = float(line.split()[1])
        elif line.startswith("PEAK"):
            out["peak_gb"] = int(line.split()[1]) * 1024 / 1e9
        elif line.startswith("REPORT"):
            out["report"] = line.split(" ", 1)[1]
    if not out["ok"]:
        out["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        if proc.returncode < 0:
            out["error"] = [f"killed by signal {-proc.returncode} (out of memory?)"]
    print(json.dumps(out), file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--dir", type=Path, required=True, help="where the random model is (written if absent)")
    parser.add_argument("--steps", type=int, default=2, help="training steps of the train measurement (0: none)")
    parser.add_argument("--skip", default="", help="comma-separated measurements to leave out")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    from lorakit.fastpath import cpu_description

    written = None
    if not (args.dir / "model.safetensors.index.json").is_file():
        start = time.perf_counter()
        written = write_model(args.dir, args.shape)
        print(f"wrote {written:.1f} GB in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    skip = set(args.skip.split(","))
    rows = []
    if "lorakit" not in skip:
        rows.append(run(LORAKIT.format(dir=str(args.dir)), "lorakit load_quantized (nf4, bf16)"))
    if "transformers" not in skip:
        rows.append(run(TRANSFORMERS.format(dir=str(args.dir)), "transformers + bitsandbytes (nf4, bf16)"))
    if args.steps and "train" not in skip:
        with tempfile.TemporaryDirectory() as out:
            code = TRAIN.format(config=str(ROOT / "examples/dates.yaml"), dir=args.dir, out=out, steps=args.steps)
            rows.append(run(code, f"lorakit train, quantize nf4, {args.steps} steps of batch 2"))
    hidden, inter, layers, _ = SHAPES[args.shape]
    lines = [
        f"### QLoRA on a {args.shape}-shaped LLaMA ({datetime.date.today()})",
        "",
        f"Command: `.venv/bin/python bench/qlora_load.py --shape {args.shape} --dir DIR --steps {args.steps}`; "
        f"machine: {cpu_description()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB. Model: hidden {hidden}, "
        f"intermediate {inter}, {layers} layers, vocab 49152, random bf16 weights.",
        "",
        "| what | peak RSS (GB) | seconds | note |",
        "|---|---|---|---|",
    ]
    for row in rows:
        note = row.get("report", "") if row["ok"] else "failed: " + " ".join(row.get("error", []))
        peak = f"{row['peak_gb']:.2f}" if "peak_gb" in row else "-"
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else "-"
        lines.append(f"| {row['label']} | {peak} | {seconds} | {note} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
