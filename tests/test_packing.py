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

from .conftest import FAMILIES, colour_rows, randomize_adapters, write_jsonl


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


def test_a_packed_run_trains_and_generates_like_an_unpacked_one(run_config, tiny_lm_dir, tmp_path):
    """With full-batch steps (every training row in every step) a packed and an unpacked run take the same
    updates: the loss of a step is the sum over the same labelled tokens divided by their count, only laid out in
    fewer, longer sequences (max_length 128: 4 rows of 29 tokens in each). So their losses, adapters, evaluations
    and greedy answers agree to float32 rounding (measured: adapter weights within 1.4e-7, the same eval loss, and
    the answer "green" to every prompt, a colour; at run_config's lr 5e-2 the rougher steps let the rounding grow
    to 3e-6 in 12 steps, and the answers are blank lines)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lorakit.train.run_data import prepare_data

    rows = 32
    write_jsonl(tmp_path / "rows.jsonl", colour_rows(rows))
    common = (f"data.train={tmp_path / 'rows.jsonl'}", "data.max_length=128", "train.lr=1e-2", "train.max_steps=12")
    common += ("train.eval_before=false",)
    packing = run_config("data.packing=true", *common)
    sequences = len(prepare_data(packing, AutoTokenizer.from_pretrained(tiny_lm_dir))[0])
    assert sequences <= rows / 4  # rows share sequences
    packed = train(run_config("data.packing=true", f"train.batch_size={sequences}", *common, out="p"), progress=False)
    plain = train(run_config(f"train.batch_size={rows}", *common, out="u"), progress=False)
    assert packed.data["train"].rows == plain.data["train"].rows == rows

    def steps(result) -> list[dict]:
        records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r["kind"] == "train"]

    p, u = steps(packed), steps(plain)
    assert [r["tokens"] for r in p] == [r["tokens"] for r in u]  # the same tokens in every step
    assert [r["loss"] for r in p] == pytest.approx([r["loss"] for r in u], rel=1e-5)
    assert p[-1]["loss"] < p[0]["loss"] - 2  # and it trained: 5.7 -> 2.8
    got, want = (
        load_file(packed.output_dir / "adapter_model.safetensors"),
        load_file(plain.output_dir / "adapter_model.safetensors"),
    )
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert packed.eval.loss == pytest.approx(plain.eval.loss, rel=1e-5)
    # generation from plain (unpacked) prompts after training: the same greedy answers, and answers of the task
    assert packed.eval.exact_match == plain.eval.exact_match and packed.eval.scored == 12
    assert packed.eval.samples == plain.eval.samples
    assert all(answer.strip() in ("red", "blue", "green") for _, _, answer in packed.eval.samples), packed.eval.samples
