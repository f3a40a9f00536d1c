"""`make demo`: LoRA on the embedded SmolLM2-135M-Instruct, end to end, with every number measured.

Loads the default model, injects LoRA, trains it for a few steps on a handful of sentences, saves the
adapter in PEFT's format, reloads it onto a fresh copy of the base model, merges it, and checks at each
stage that the logits agree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lorakit
from lorakit.models import load_model

FACTS = [
    "lorakit keeps the base weights frozen and trains two small matrices beside each layer.",
    "An adapter file holds only the low-rank matrices, a few megabytes instead of the whole model.",
    "Merging adds the scaled product of B and A into the frozen weight, so inference costs nothing extra.",
    "One base model can carry many adapters and pick one per request.",
]
PROMPT = "An adapter file holds only"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/demo-adapter", help="where the adapter is written")
    parser.add_argument("--steps", type=int, default=12, help="training steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    started = time.perf_counter()
    model, tokenizer = load_model("default")
    print(f"[1/6] loaded SmolLM2-135M-Instruct in {time.perf_counter() - started:.1f} s")

    config = lorakit.LoraConfig(
        r=16,
        alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    lorakit.inject(model, config)
    print(f"[2/6] injected LoRA r=16 on 7 projections x 30 layers\n      {lorakit.trainable_summary(model)}")

    batch = tokenizer(FACTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    print(f"[3/6] trained {args.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    out = Path(args.out)
    lorakit.save_adapter(model, out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"[4/6] saved adapter to {out} ({size / 2**20:.1f} MiB: {', '.join(sorted(f.name for f in out.iterdir()))})")

    probe = tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        trained_logits = model(**probe).logits
    fresh, _ = load_model("default")
    with torch.no_grad():
        base_logits = fresh(**probe).logits
    lorakit.load_adapter(fresh, out)
    with torch.no_grad():
        reloaded = fresh(**probe).logits
    print(
        f"[5/6] reloaded onto a fresh base model: max |logit diff| vs trained model {_diff(reloaded, trained_logits):.2e}"
        f" (the adapter moves logits by up to {_diff(trained_logits, base_logits):.2f} from the base)"
    )

    lorakit.merge(fresh)
    with torch.no_grad():
        merged = fresh(**probe).logits
    lorakit.unmerge(fresh)
    print(f"[6/6] merged into the weights: max |logit diff| vs unmerged {_diff(merged, reloaded):.2e}")

    _show_generation(fresh, tokenizer)
    ok = _diff(reloaded, trained_logits) < 1e-4 and _diff(merged, reloaded) < 1e-3
    print(
        f"\n{'OK' if ok else 'MISMATCH'}: outputs agree after save/load and merge. Total {time.perf_counter() - started:.0f} s"
    )
    if not ok:
        raise SystemExit(1)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _show_generation(model, tokenizer) -> None:
    ids = tokenizer([PROMPT], return_tensors="pt")
    kwargs = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    with torch.no_grad(), lorakit.disabled(model):
        base = model.generate(**ids, **kwargs)
    with torch.no_grad():
        tuned = model.generate(**ids, **kwargs)
    cut = ids["input_ids"].shape[1]
    print(f"\n  prompt : {PROMPT!r}")
    print(f"  base   : {tokenizer.decode(base[0, cut:], skip_special_tokens=True)!r}")
    print(f"  adapted: {tokenizer.decode(tuned[0, cut:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
