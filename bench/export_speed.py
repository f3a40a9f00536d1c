"""Decode speed of an exported adapter in llama.cpp against lorakit, same prompts, same machine.

    .venv/bin/python bench/export_speed.py --adapter out/dates [--tokens 64] [--repeats 3]

Modes, alternated over the repeats, medians reported (greedy, exactly --tokens new tokens per prompt, one
prompt at a time, 2 threads on the 2-core box):
  llama.cpp + adapter   the untouched Q4_1 base GGUF with the `lorakit export --format gguf-lora` file
  llama.cpp merged q8_0 the `lorakit export --format gguf --dtype q8_0` file
  llama.cpp base        the Q4_1 base alone
  lorakit unmerged      the embedded model (float32) with the adapter, a KV-cached greedy loop (as generate)
  lorakit merged        the same with the adapter merged
  lorakit serve         `lorakit serve --adapter dates=DIR` in a child process, streamed /v1/completions
                        with ignore_eos; time between the first and the last streamed token
Needs llama-cpp-python (`make test-slow` builds it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

import lorakit
from lorakit.export import export_adapter
from lorakit.fastpath import cpu_description
from lorakit.models import default_gguf, kv_cache_inputs, kv_cache_output

PROMPTS = ("May 3rd, 1999", "the twelfth of June, 1944", "January 1st, 2000", "October 31st, 1517")


def _prompt_ids(tokenizer) -> list[list[int]]:
    system = {"role": "system", "content": "Write the date as YYYY-MM-DD."}
    texts = [
        tokenizer.apply_chat_template(
            [system, {"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in PROMPTS
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _llama(lora: Path | None, threads: int, model: Path | None = None):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(model or default_gguf()), lora_path=None if lora is None else str(lora), n_ctx=512,
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )  # fmt: skip


def _greedy(llm) -> int:
    """The argmax of the last evaluated position's logits. llama-cpp-python 0.3.36 no longer copies logits into
    ``llm.scores`` unless ``logits_all`` is set (those read zeros: token 0 every step), so read the context's."""
    import numpy as np

    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def _time_llama(llm, prompts: list[list[int]], tokens: int) -> float:
    """Seconds per generated token over all prompts (prompt processing excluded)."""
    total = 0.0
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        started = time.perf_counter()
        for _ in range(tokens):
            llm.eval([_greedy(llm)])
        total += time.perf_counter() - started
    return total / (tokens * len(prompts))


@torch.no_grad()
def _time_lorakit(model, prompts: list[list[int]], tokens: int) -> float:
    total = 0.0
    for ids in prompts:
        x = torch.tensor([ids])
        out = model(input_ids=x, use_cache=True)  # prompt processing, excluded as for llama.cpp
        past, token = kv_cache_output(out), out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=token, use_cache=True, **kv_cache_inputs(model, past))
            past, token = kv_cache_output(out), out.logits[:, -1:].argmax(-1)
        total += time.perf_counter() - started
    return total / (tokens * len(prompts))


class _Server:
    """`lorakit serve` in a child process on a free local port."""

    def __init__(self, adapter: str, threads: int):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "lorakit", "serve", "--adapter", f"dates={adapter}", "--port", str(self.port)]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                if self.process.poll() is not None:
                    raise SystemExit("lorakit serve exited before it was ready") from None
                time.sleep(1)
        raise SystemExit("lorakit serve was not ready after 300 s")

    def time_decode(self, prompts: list[list[int]], tokens: int) -> float:
        """Seconds per streamed token after the first (prompt processing excluded, as for the others)."""
        total = 0.0
        for ids in prompts:
            body = {"model": "dates", "prompt": ids, "max_tokens": tokens + 1, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.port}/v1/completions", json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )  # fmt: skip
            stamps, generated = [], 0
            with urllib.request.urlopen(request, timeout=300) as response:
                for line in response:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices"):  # text events (a token's text may wait for the next one's bytes)
                        stamps.append(time.perf_counter())
                    generated = (event.get("usage") or {}).get("completion_tokens", generated)
            if generated != tokens + 1:
                raise SystemExit(f"lorakit serve generated {generated} tokens, expected {tokens + 1}")
            total += stamps[-1] - stamps[0]
        return total / (tokens * len(prompts))

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        lora, q8 = Path(tmp) / "adapter.gguf", Path(tmp) / "merged-q8_0.gguf"
        export_adapter(args.adapter, lora, parity=False)
        export_adapter(args.adapter, q8, fmt="gguf", dtype="q8_0", parity=False)
        unmerged, tokenizer = lorakit.load_model("default")
        lorakit.load_adapter(unmerged, args.adapter)
        merged, _ = lorakit.load_model("default")
        lorakit.load_adapter(merged, args.adapter)
        lorakit.merge(merged)
        prompts = _prompt_ids(tokenizer)
        with_adapter, base = _llama(lora, args.threads), _llama(None, args.threads)
        merged_q8 = _llama(None, args.threads, q8)
        server = _Server(args.adapter, args.threads)
        runs = {
            "llama.cpp + adapter (Q4_1 base)": lambda: _time_llama(with_adapter, prompts, args.tokens),
            "llama.cpp merged (q8_0)": lambda: _time_llama(merged_q8, prompts, args.tokens),
            "llama.cpp base (Q4_1)": lambda: _time_llama(base, prompts, args.tokens),
            "lorakit unmerged (float32)": lambda: _time_lorakit(unmerged, prompts, args.tokens),
            "lorakit merged (float32)": lambda: _time_lorakit(merged, prompts, args.tokens),
            "lorakit serve, adapter unmerged (float32, HTTP stream)": lambda: server.time_decode(prompts, args.tokens),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        try:
            for _ in range(args.repeats):
                for name, run in runs.items():
                    times[name].append(run())
        finally:
            server.close()
    print(f"\nDecode speed, {len(PROMPTS)} prompts x {args.tokens} tokens, greedy, one prompt at a time; "
          f"machine: {cpu_description()}, {args.threads} threads, torch {torch.__version__}\n")  # fmt: skip
    print("| mode | median ms / token | tokens/s |\n|---|---|---|")
    for name, values in times.items():
        per_token = statistics.median(values)
        print(f"| {name} | {1000 * per_token:.1f} | {1 / per_token:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
