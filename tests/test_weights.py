"""Int8 inference weights (``lorakit.weights``): the layer's numbers, which layers change, adapters beside an int8
base (routed batches, adapters loaded afterwards), the merge refusal, the ``--weights`` decision and the
answers it keeps."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.cli.main import main
from lorakit.weights import Int8Linear, int8_supported, quantize_int8, resolve_weights

from .conftest import colour_rows, decode_in_one_batch, randomize_adapters, save_tiny_lm, write_jsonl

pytestmark = pytest.mark.skipif(not int8_supported("cpu"), reason="this torch build has no CPU int8 weight product")


def test_int8_linear_is_the_dequantized_product_and_keeps_the_callers_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = Int8Linear(linear)
    assert layer.weight.dtype == torch.int8 and layer.scale.shape == (40,)
    assert (layer.weight.abs().amax(1) >= 126).all()  # each row's largest entry takes (nearly) the full range
    error = (layer.dequantized() - linear.weight).abs().amax(1)
    assert (error <= 0.5 * layer.scale.float() * (1 + 1e-5)).all()  # rounding: at most half a step per entry
    x = torch.randn(3, 5, 96)
    reference = x.bfloat16().float() @ layer.dequantized().T + linear.bias
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 40)
    assert torch.allclose(out, reference, atol=0.05, rtol=0.02)
    assert (out - linear(x)).abs().max() < 0.06  # and close to the float layer it replaced
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert "int8 weights" in repr(layer)


def test_many_rows_multiply_a_dequantized_copy_and_a_head_sized_weight_keeps_the_kernel(monkeypatch):
    """From DEQUANTIZE_ROWS rows on (a prefill), the layer multiplies a bf16 copy of its dequantized weight: the
    same product to bf16 rounding, and the kernel is not called; fewer rows, or a weight above
    DEQUANTIZE_MAX_NUMEL entries, run the kernel."""
    from lorakit import weights

    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(96, 40))
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    many = torch.randn(weights.DEQUANTIZE_ROWS, 96)
    reference = many.bfloat16().float() @ layer.dequantized().T + layer.bias
    assert torch.allclose(layer(many), reference, atol=0.05, rtol=0.02) and calls == []
    layer(many[:-1])
    assert calls == [weights.DEQUANTIZE_ROWS - 1]
    monkeypatch.setattr(weights, "DEQUANTIZE_MAX_NUMEL", 96 * 40 - 1)  # as if it were a vocabulary-sized head
    assert torch.allclose(layer(many), reference, atol=0.05, rtol=0.02) and calls[-1] == weights.DEQUANTIZE_ROWS


def _lm_with_adapters(tiny_lm_dir, names=("a", "b")):
    model, tokenizer = lorakit.load_model(tiny_lm_dir)
    for i, name in enumerate(names):
        targets = "all-linear" if i == 0 else ["q_proj", "v_proj"]
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, init="random"), name)
        randomize_adapters(model, seed=i, scale=0.3)
    return model, tokenizer


def test_quantize_int8_changes_the_base_linears_and_no_adapter_tensor(tiny_lm_dir):
    model, _ = _lm_with_adapters(tiny_lm_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "c")
    adapters = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lora_" not in n]
    report = quantize_int8(model)
    int8 = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert report.layers == len(int8) > 0 and report.bytes_after < 0.3 * report.bytes_before
    assert all("lora_" not in n and "modules_to_save" not in n for n in int8)
    assert {n for n in plain if not n.startswith("lm_head")} == int8  # every base linear
    assert "lm_head.original_module" in plain  # a modules_to_save head stays float: its rows are routed
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) and after[n].dtype == p.dtype for n, p in adapters.items())
    with pytest.raises(ValueError, match="cannot merge into a torch.int8-valued base weight"):
        lorakit.merge(model, "a")


def test_a_mixed_batch_over_an_int8_base_gives_each_adapter_its_own_tokens(tiny_lm_dir):
    """Routed rows (base, a, b in one forward) over the int8 base decode as each adapter alone over the same
    int8 base; an adapter loaded after quantizing goes beside the int8 layers and changes the output."""
    from lorakit.serve.engine import Engine

    model, tokenizer = _lm_with_adapters(tiny_lm_dir)
    quantize_int8(model)
    prompts = [tokenizer(p)["input_ids"] for p in ("the colour of item 3 is", "item 12")]
    requests = decode_in_one_batch(Engine(model, tokenizer, max_batch_size=8), prompts, [None, "a", "b"], tokens=6)
    for request in requests:
        lorakit.set_active(model, request.adapter or "a")
        with lorakit.disabled(model) if request.adapter is None else contextlib.nullcontext():
            out = model.generate(torch.tensor([request.prompt_ids]), max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, pad_token_id=0)  # fmt: skip
        assert request.generated == out[0, len(request.prompt_ids) :].tolist()
    assert len({tuple(r.generated) for r in requests[:3]}) == 3

    ids = torch.tensor([prompts[0]])
    with lorakit.disabled(model):
        before = model(ids).logits
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"), "late")
    randomize_adapters(model, seed=9, scale=0.3)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj").base_layer, Int8Linear)
    lorakit.set_active(model, "late")
    assert not torch.allclose(model(ids).logits, before)


def test_auto_takes_int8_where_the_cpu_multiplies_bf16_natively():
    cpu = torch.device("cpu")
    assert resolve_weights("auto", cpu, native_bf16=True)[0] == "int8"
    assert resolve_weights("auto", cpu, native_bf16=False)[0] == "precision"
    assert resolve_weights("auto", cpu, native_bf16=True, precision="fp32")[0] == "precision"  # fp32 stays fp32
    assert resolve_weights("int8", cpu, native_bf16=False) == ("int8", "as asked")
    assert resolve_weights("precision", cpu, native_bf16=True) == ("precision", "as asked")
    with pytest.raises(ValueError, match="--weights 'int4': use one of auto, precision, int8"):
        resolve_weights("int4", cpu, native_bf16=True)


def test_int8_weights_keep_the_answers_of_a_trained_adapter(tmp_path, tiny_tokenizer, capsys):
    """A tiny model trained on the colour task: exact match on held-out rows with int8 weights within one row
    of float32's (the issue's bar: within 1 point on the 200 dates, measured by bench/serve_speed.py)."""
    model_dir = save_tiny_lm(tmp_path / "lm", tiny_tokenizer, initializer_range=0.2)
    write_jsonl(tmp_path / "train.jsonl", colour_rows(96))
    write_jsonl(tmp_path / "eval.jsonl", colour_rows(24, seed=1))
    sets = [f"model={model_dir}", f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'train.jsonl'}",
            "data.max_length=32", "lora.r=8", "lora.alpha=16", "lora.modules_to_save=[lm_head]",
            "train.max_steps=40", "train.batch_size=8", "train.lr=5e-2", "train.warmup_steps=2",
            "train.generate_eval=false", "precision=fp32"]  # fmt: skip
    assert main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    scores = {}
    for weights in ("precision", "int8"):
        capsys.readouterr()
        assert main(["eval", "--model", str(model_dir), "--adapter", str(tmp_path / "run"), "--data",
                     str(tmp_path / "eval.jsonl"), "--json", "--precision", "fp32", "--weights", weights, "--max-new-tokens", "2"]) == 0  # fmt: skip
        out, err = capsys.readouterr()
        scores[weights] = json.loads(out.strip().splitlines()[-1])
        assert ("weights: int8 (as asked)" in err) == (weights == "int8")
    assert scores["precision"]["loss"] < 0.5  # the adapter learned the task (an untrained model: ~4)
    assert scores["int8"]["exact_match"] >= scores["precision"]["exact_match"] - 1 / 24
    assert abs(scores["int8"]["loss"] - scores["precision"]["loss"]) < 0.05 + 0.05 * scores["precision"]["loss"]
