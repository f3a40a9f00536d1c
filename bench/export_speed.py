"""Decode speed of an exported adapter in llama.cpp against lorakit, same prompts, same machine.

    .venv/bin/python bench/export_speed.py --adapter out/dates [--tokens 64] [--repeats 3]

Modes, alternated over the repeats, medians reported (greedy, exactly --tokens new tokens per prompt, one
prompt at a time, 2 threads on the 2-core box):
  llama.cpp + adapter   the untouched Q4_1 base GGUF with the `lorakit export --format gguf-lora` file
  llama.cpp base        the Q4_1 base alone
  lorakit unmerged      the embedded model (float32) with the adapter, transformers' generate
  lorakit merged        the same with the adapter merged
Needs llama-cpp-python (`make test-slow` builds it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit.export import export_adapter
from lorakit.fastpath import cpu_description
from lorakit.models import default_gguf

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


def _llama(lora: Path | None, threads: int):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(default_gguf()), lora_path=None if lora is None else str(lora), n_ctx=512,
        n_threads=threads, verbose=False,
    )  # fmt: skip


def _time_llama(llm, prompts: list[list[int]], tokens: int) -> float:
    """Seconds per generated token over all prompts (prompt processing excluded)."""
    total = 0.0
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        started = time.perf_counter()
        for _ in range(tokens):
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([token])
        total += time.perf_counter() - started
    return total / (tokens * len(prompts))


@torch.no_grad()
def _time_lorakit(model, prompts: list[list[int]], tokens: int) -> float:
    total = 0.0
    for ids in prompts:
        x = torch.tensor([ids])
        out = model(input_ids=x, use_cache=True)  # prompt processing, excluded as for llama.cpp
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        total += time.perf_counter() - started
    return total / (tokens * len(prompts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / "adapter.gguf"
        export_adapter(args.adapter, lora, parity=False)
        unmerged, tokenizer = lorakit.load_model("default")
        lorakit.load_adapter(unmerged, args.adapter)
        merged, _ = lorakit.load_model("default")
        lorakit.load_adapter(merged, args.adapter)
        lorakit.merge(merged)
        prompts = _prompt_ids(tokenizer)
        with_adapter, base = _llama(lora, args.threads), _llama(None, args.threads)
        runs = {
            "llama.cpp + adapter (Q4_1 base)": lambda: _time_llama(with_adapter, prompts, args.tokens),
            "llama.cpp base (Q4_1)": lambda: _time_llama(base, prompts, args.tokens),
            "lorakit unmerged (float32)": lambda: _time_lorakit(unmerged, prompts, args.tokens),
            "lorakit merged (float32)": lambda: _time_lorakit(merged, prompts, args.tokens),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(run())
    print(f"\nDecode speed, {len(PROMPTS)} prompts x {args.tokens} tokens, greedy, one prompt at a time; "
          f"machine: {cpu_description()}, {args.threads} threads, torch {torch.__version__}\n")  # fmt: skip
    print("| mode | median ms / token | tokens/s |\n|---|---|---|")
    for name, values in times.items():
        per_token = statistics.median(values)
        print(f"| {name} | {1000 * per_token:.1f} | {1 / per_token:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
