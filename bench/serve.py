"""Serving throughput: lorakit serve (continuous batching across adapters) against one-at-a-time PEFT.

Eight clients, each on its own adapter, each generating exactly 64 tokens (EOS ignored) from the embedded
model. Three modes, run in turn and repeated; the median wall time of each gives its throughput:

- ``lorakit-mixed``: a `lorakit serve` process, 8 concurrent clients (openai client), 8 different adapters;
- ``lorakit-same``: the same server, 8 concurrent clients all on one adapter;
- ``peft-serial``: PEFT in this process, one request at a time: ``set_adapter`` then ``generate``.

    .venv/bin/python bench/serve.py [--repeats 3] [--tokens 64] [--clients 8] [--markdown BENCHMARKS.md]

The server and PEFT never run at the same time (the PEFT model is loaded only while its turn runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lorakit.fastpath import cpu_description

PROMPTS = [
    "Convert 3 March 2021 to ISO format.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Name a colour of the rainbow.",
    "What is 12 times 7?",
    "Describe a cat in five words.",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(directory: Path, count: int) -> list[str]:
    """``count`` rank-16 adapters with random (non-zero) B, so each one changes the outputs."""
    import lorakit

    model, _ = lorakit.load_model("default")
    names = [f"task{i}" for i in range(count)]
    gen = torch.Generator().manual_seed(0)
    for name in names:
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS), name)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f"lora_B.{name}." in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
        lorakit.save_adapter(model, directory / name, name)
    return names


def chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def start_server(directory: Path, names: list[str], clients: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "lorakit", "serve", "--model", "default", "--port", str(port)]
    args += ["--max-batch-size", str(clients)]
    for name in names:
        args += ["--adapter", f"{name}={directory / name}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited: " + proc.stderr.read().decode())
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start in 300 s")


def run_clients(port: int, prompts: list[str], adapters: list[str], tokens: int) -> tuple[float, int]:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)

    def one(job):
        prompt, adapter = job
        resp = client.completions.create(
            model=adapter, prompt=prompt, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return resp.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        counts = list(pool.map(one, zip(prompts, adapters, strict=True)))
    return time.perf_counter() - start, sum(counts)


def peft_serial(
    directory: Path, names: list[str], prompts: list[str], tokens: int, repeats: int
) -> list[tuple[float, int]]:
    from peft import PeftModel

    import lorakit

    base, tokenizer = lorakit.load_model("default")
    model = PeftModel.from_pretrained(base, directory / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(directory / name, adapter_name=name)
    model.eval()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        produced = 0
        for prompt, name in zip(prompts, names, strict=True):
            model.set_adapter(name)
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **ids,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
            produced += out.shape[1] - ids["input_ids"].shape[1]
        runs.append((time.perf_counter() - start, produced))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--markdown", help="append the result table to this Markdown file")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from lorakit.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("default"))
    prompts = [chat_prompt(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(args.clients)]
    results: dict[str, list[tuple[float, int]]] = {"lorakit-mixed": [], "lorakit-same": [], "peft-serial": []}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        print("making adapters ...", file=sys.stderr)
        names = make_adapters(directory, args.clients)
        for r in range(args.repeats):
            print(f"round {r + 1}/{args.repeats}: lorakit server", file=sys.stderr)
            proc, port = start_server(directory, names, args.clients)
            try:
                run_clients(port, prompts[:2], names[:2], 4)  # warm-up
                order = ["lorakit-mixed", "lorakit-same"] if r % 2 == 0 else ["lorakit-same", "lorakit-mixed"]
                for mode in order:
                    adapters = names if mode == "lorakit-mixed" else [names[0]] * args.clients
                    results[mode].append(run_clients(port, prompts, adapters, args.tokens))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        print("PEFT one request at a time", file=sys.stderr)
        results["peft-serial"] = peft_serial(directory, names, prompts, args.tokens, args.repeats)
    summary = {}
    for mode, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        produced = runs[0][1]
        summary[mode] = {"median_wall_s": wall, "tokens": produced, "tokens_per_s": produced / wall, "runs": runs}
    mixed = summary["lorakit-mixed"]["tokens_per_s"]
    ratios = {
        "mixed_vs_peft": mixed / summary["peft-serial"]["tokens_per_s"],
        "mixed_vs_same": mixed / summary["lorakit-same"]["tokens_per_s"],
    }
    table = render(summary, ratios, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "ratios": ratios}, indent=2))
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(table)
    return 0


def render(summary, ratios, args) -> str:
    machine = f"{cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    lines = [
        f"\n### Serving: {args.clients} clients x {args.tokens} tokens, embedded model ({datetime.date.today()})\n",
        f"Command: `.venv/bin/python bench/serve.py --repeats {args.repeats}`; machine: {machine}; "
        "median of the repeats.\n",
        "| mode | median wall (s) | tokens | tokens/s |",
        "|---|---|---|---|",
    ]
    for mode, s in summary.items():
        lines.append(f"| {mode} | {s['median_wall_s']:.2f} | {s['tokens']} | {s['tokens_per_s']:.1f} |")
    lines.append("")
    lines.append(
        f"lorakit (8 adapters) / PEFT one at a time: **{ratios['mixed_vs_peft']:.2f}x** (target >= 3x); "
        f"lorakit 8 adapters / 1 adapter: **{ratios['mixed_vs_same']:.2f}x** (target >= 0.8x)."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
