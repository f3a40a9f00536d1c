"""data.packing: a packed batch gives the loss and gradients of its rows run one by one (no token attends
across rows, positions restart), for LLaMA- and GPT-2-style models, on the fused and the plain loss path."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import lorakit
from lorakit.data import IGNORE, Example, collate, pack
from lorakit.train.tasks import CausalLM
from lorakit.train.trainer import train

from .conftest import FAMILIES, randomize_adapters


def _rows(seed: int = 0) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in (5, 9, 3, 12, 7, 4, 10, 6):
        ids = torch.randint(1, 64, (n,), generator=gen).tolist()
        labels = [IGNORE] * (n // 3) + ids[n // 3 :]  # a prompt without loss, then the answer
        rows.append(Example(ids, labels))
    return rows


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # sdpa takes the boolean mask, eager an additive one
def test_a_packed_batch_equals_its_rows_one_by_one(name, fused, attention, cpu_gemm):
    family = FAMILIES[name]
    model = family.build()
    model.config._attn_implementation = attention
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets, init="random"))
    randomize_adapters(model)
    model.eval()  # GPT-2's dropout would make two forwards differ; gradients flow all the same
    task = CausalLM()
    task.fused_loss = fused
    params = [p for p in model.parameters() if p.requires_grad]
    rows = _rows()
    separate = sum(task.train_loss_sum(model, collate([row], 0)) for row in rows)
    separate.backward()
    want = [p.grad.clone() for p in params]
    model.zero_grad()
    packed = pack(rows, 20)
    assert len(packed) < len(rows) and all(len(e.input_ids) <= 20 for e in packed)
    batch = collate(packed, 0)
    together = task.train_loss_sum(model, batch)
    together.backward()
    assert_close(together, separate, rtol=1e-5, atol=1e-5)
    for got, expected in zip([p.grad for p in params], want, strict=True):
        assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert task.batch_units(batch) == sum(task.batch_units(collate([r], 0)) for r in rows)


def test_a_packed_run_trains_and_generates_like_an_unpacked_one(run_config):
    result = train(run_config("data.packing=true", "train.batch_size=2", "train.max_steps=12"), progress=False)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert result.eval.exact_match is not None  # generation from plain (unpacked) prompts, after training
    model, tokenizer = lorakit.load_model(str(run_config().model))
    lorakit.load_adapter(model, result.output_dir)
    ids = torch.tensor([tokenizer("colour of item 3?")["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
