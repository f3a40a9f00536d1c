"""QLoRA: a bitsandbytes-quantized base with full-precision LoRA, on CPU."""

import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import _bnb
from lorakit.cli.main import main as cli_main
from lorakit.layers import LoraLayer
from lorakit.quant import dequantize, dequantized_weight, is_quantized, quantize, requantization_drift

from .conftest import pack_for_cpu, randomize_adapters, train_lm_steps

pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed=0, hidden=128, heads=4):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def _quantized(method="nf4", layout="plain", **kwargs):
    """A tiny LLaMA quantized by lorakit, its 4-bit weights then in bitsandbytes' ``layout``: ``packed``
    rewrites them as an AVX-512 BF16 CPU's eval forward would (forced here on any CPU)."""
    model = _llama(**kwargs)
    quantize(model, method)
    if layout == "packed":
        assert pack_for_cpu(model) == 14
    return model


def _ids(batch=2, length=12, seed=1):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_quantize_shrinks_linear_weights_and_keeps_outputs_close(method):
    model = _llama()
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
    report = quantize(model, method)
    assert report.layers == 2 * 7  # every projection; not the output head
    assert not is_quantized(model.lm_head) and type(model.lm_head) is nn.Linear
    assert report.ratio >= (3.5 if method == "int8" else 5.0), report.describe()
    assert "smaller" in report.describe()
    with torch.no_grad():
        logits = model(ids).logits
    relative = (logits - reference).norm() / reference.norm()
    assert 0 < relative < (0.05 if method == "int8" else 0.25)


def test_lora_trains_on_an_nf4_base_and_the_adapter_works_on_the_float_base(tmp_path):
    model = _llama()
    quantize(model, "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(
        p.dtype == torch.float32 and "lora_" in n for n, p in model.named_parameters() if p.requires_grad
    )
    model.train()
    ids = _ids(batch=4, length=16)
    losses = train_lm_steps(model, params, ids, steps=12, lr=3e-3)
    assert losses[-1] < losses[0] - 0.05
    lorakit.save_adapter(model, tmp_path / "qlora")
    float_model = _llama()
    lorakit.load_adapter(float_model, tmp_path / "qlora")
    model.eval()
    with torch.no_grad():
        on_nf4, on_float = model(ids).logits, float_model(ids).logits
    assert (on_nf4 - on_float).norm() / on_float.norm() < 0.25  # only the base's rounding differs


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_merge_refuses_a_quantized_base_and_dequantize_then_merge_is_exact(layout):
    model = _quantized("nf4", layout)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TARGETS, init="random"))
    assert not any(_bnb.is_cpu_packed(m) for m in model.modules())  # the wrapped layers are back on plain
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids).logits
    with pytest.raises(ValueError, match="cannot merge into a nf4-quantized base.*dequantize"):
        lorakit.merge(model)
    assert dequantize(model) == 14 and not any(is_quantized(m) for m in model.modules())
    with torch.no_grad():
        assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)  # same weights, now float
    lorakit.merge(model)
    with torch.no_grad():
        assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    drift = requantization_drift(lorakit.unload(model), "nf4", {"input_ids": ids})
    assert drift["max_abs"] > 0 and 0 <= drift["top1_changed"] <= 1


@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_dora_on_a_quantized_base(layout, bnb_cpu):
    model = _quantized("nf4", layout)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    ids = _ids()
    with torch.no_grad():
        start = model(ids).logits
    with torch.no_grad(), lorakit.disabled(model):
        base = model(ids).logits
    assert_close(start, base, rtol=1e-4, atol=1e-4)  # DoRA starts as the identity, on the dequantized weights
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "magnitude" in n)


def test_quantize_refusals(monkeypatch):
    model = _llama()
    with pytest.raises(ValueError, match="not supported; use one of nf4, fp4, int8"):
        quantize(model, "int4")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="before adding adapters"):
        quantize(model, "nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ValueError, match="needs bitsandbytes.*pip install 'bitsandbytes>=0.50'"):
        quantize(_llama(), "nf4")
    with pytest.raises(ValueError, match="quantize='q3': use nf4, fp4 or int8"):
        from lorakit.train.config import RunConfig

        RunConfig(quantize="q3")


def test_train_and_merge_cli_with_quantize(tiny_lm_dir, tmp_path, capsys, bnb_cpu):
    # tiny_lm_dir's layers have in_features 32, below nf4's block size of 64: bitsandbytes' repacking on an
    # AVX-512 BF16 CPU cannot take them (it crashed `lorakit merge --quantize` there before lorakit kept them plain)
    from lorakit.train.config import load_config

    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"prompt": "{i} plus 1 is", "completion": " {i + 1}"}}\n' for i in range(24)))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_lm_dir}\nquantize: nf4\noutput_dir: {tmp_path / 'run'}\n"
        f"data: {{train: {data}, eval_fraction: 0.0}}\n"
        "lora: {r: 4, alpha: 8, target_modules: all-linear}\n"
        "train: {max_steps: 3, batch_size: 4, lr: 0.001, generate_eval: false, eval_before: false}\n"
    )
    from lorakit.train.trainer import train

    result = train(load_config(config), progress=False)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file() and result.steps == 3
    assert "quantized" in capsys.readouterr().err
    out = tmp_path / "merged"
    code = cli_main(
        [
            "merge",
            "--model",
            str(tiny_lm_dir),
            "--adapter",
            str(tmp_path / "run"),
            "--out",
            str(out),
            "--quantize",
            "nf4",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "saved in float32, not nf4" in err and "re-quantizing the merged weights to nf4" in err
    assert "max |logit diff| vs adapted model = " in err
    diff = float(err.split("max |logit diff| vs adapted model = ")[1].split()[0])
    assert diff < 1e-3


def _plain_with_bf16_scales(weight):
    """What the packed layout's kernel multiplies by, from the plain layout and bitsandbytes' own dequantize:
    the same codes with every block's scale rounded to bfloat16 (the packing stores them so)."""
    import copy

    from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise

    state = copy.deepcopy(weight.quant_state)
    absmax = state.absmax
    if state.nested:
        absmax = dequantize_blockwise(absmax, state.state2) + state.offset
        state.nested, state.state2, state.offset = False, None, None
    state.absmax = absmax.float().to(torch.bfloat16).float()
    return dequantize_4bit(weight.data, state)


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_dequantized_weight_reads_both_cpu_layouts(method):
    model = _quantized(method)
    layers = [m for m in model.modules() if is_quantized(m)]
    expected = [_plain_with_bf16_scales(m.weight) for m in layers]
    plain = [dequantized_weight(m) for m in layers]
    assert pack_for_cpu(model) == len(layers) == 14
    for layer, want, before in zip(layers, expected, plain, strict=True):
        assert _bnb.is_cpu_packed(layer)
        got = dequantized_weight(layer)
        assert_close(got, want, rtol=0, atol=0)  # exactly the plain codes with bfloat16 scales
        assert_close(got, before, rtol=2**-8, atol=1e-6)  # and so the plain weight to bfloat16 rounding


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_a_packed_layer_goes_back_to_the_plain_layout_exactly(method):
    model = _quantized(method, layout="packed")
    ids = _ids()
    layers = [m for m in model.modules() if is_quantized(m)]
    packed = [dequantized_weight(m) for m in layers]
    for layer in layers:
        _bnb.keep_plain_layout(layer)
        assert not _bnb.is_cpu_packed(layer) and layer.support_avx512bf16_for_cpu is False
    for layer, weight in zip(layers, packed, strict=True):
        assert_close(dequantized_weight(layer), weight, rtol=0, atol=0)
        x = torch.randn(5, layer.in_features)
        with torch.no_grad():
            assert_close(layer(x), x @ weight.T + layer.bias if layer.bias is not None else x @ weight.T)
    float_model = _llama()
    with torch.no_grad():
        dequantize(model)
        assert model(ids).logits.isfinite().all() and float_model(ids).logits.shape == model(ids).logits.shape


@pytest.mark.parametrize("hidden", [32, 96, 128])
def test_quantized_layers_stay_plain_where_bitsandbytes_would_repack(hidden, bnb_cpu):
    """hidden 32: in_features below the block size; 96: not a multiple of it; 128: a multiple (repackable)."""
    model = _llama(hidden=hidden, heads=2)
    quantize(model, "nf4")
    ids = _ids()
    model.eval()
    with torch.no_grad():
        quantized = model(ids).logits  # an eval forward is where bitsandbytes would repack on AVX-512 BF16
    assert not any(_bnb.is_cpu_packed(m) for m in model.modules())
    dequantize(model)
    with torch.no_grad():
        assert_close(model(ids).logits, quantized, rtol=1e-4, atol=1e-4)


def test_lora_on_a_packed_base_trains_through_the_base_layers():
    """A packed layer has no autograd: lorakit puts wrapped layers back on the plain layout, so gradients
    reach the adapters below them (checked against the same adapter on the dequantized float weights)."""
    model = _quantized("nf4", layout="packed")
    reference = _quantized("nf4", layout="packed")
    dequantize(reference)
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random")
    for m in (model, reference):
        torch.manual_seed(7)  # the same random A and B on both
        lorakit.inject(m, config)
        m.train()
        m(input_ids=_ids(), labels=_ids()).loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_nf4_dequantize_then_merge_of_the_embedded_model_equals_merging_into_the_dequantized_weights(layout):
    model, tokenizer = lorakit.load_model("default")
    quantize(model, "nf4")
    if layout == "packed":
        assert pack_for_cpu(model) > 0  # as an Intel CPU with AVX-512 BF16 leaves it after an eval forward
    weights = {p: dequantized_weight(m) for p, m in model.named_modules() if is_quantized(m)}
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(model, scale=0.02)
    ids = tokenizer("LoRA merges exactly", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = model(ids).logits
    expected = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            expected[path] = weights[f"{path}.base_layer" if f"{path}.base_layer" in weights else path]
            expected[path] = expected[path] + module.delta_weight("default")
    dequantize(model)
    lorakit.merge(model)
    for path, weight in expected.items():
        assert_close(model.get_submodule(path).base_layer.weight, weight, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)


# ----- mixed precision (issue 28): a bf16 compute dtype under bf16-mixed, float32 adapters over it ------------
def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want.detach().float()).norm() / want.detach().float().norm())


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_the_compute_dtype_follows_the_base_and_the_adapter_policy_sees_it(method):
    """bf16-mixed stores the base in bf16: quantizing it gives bf16 compute layers (also int8, whose bitsandbytes
    class has no compute dtype: quantize records it), and inject's default puts float32 adapters over them."""
    model = _llama().to(torch.bfloat16)
    quantize(model, method)
    quantized = [m for m in model.modules() if is_quantized(m)]
    assert len(quantized) == 14 and {_bnb.float_dtype(m) for m in quantized} == {torch.bfloat16}
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=TARGETS))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "kept", adapter_dtype="base")
    assert {p.dtype for n, p in model.named_parameters() if ".kept." in n} == {torch.bfloat16}  # precision bf16
    explicit = _llama()
    quantize(explicit, method, compute_dtype=torch.bfloat16)  # a float32 model quantized for bf16 compute
    assert {_bnb.float_dtype(m) for m in explicit.modules() if is_quantized(m)} == {torch.bfloat16}
    unchanged = _llama()
    quantize(unchanged, method)
    assert {_bnb.float_dtype(m) for m in unchanged.modules() if is_quantized(m)} == {torch.float32}
    with pytest.raises(ValueError, match="compute_dtype=torch.int8: use a float dtype"):
        quantize(_llama(), method, compute_dtype=torch.int8)


def _mixed_qlora(method: str):
    """(QLoRA model, its reference) under bf16-mixed: a bf16 base quantized to ``method``, random float32 LoRA on
    every projection; the reference holds the same adapters over the dequantized weights as bf16 nn.Linear."""
    import copy

    model = _llama().to(torch.bfloat16)
    quantize(model, method)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TARGETS, init="random"))
    randomize_adapters(model, scale=0.05)
    reference = copy.deepcopy(model)
    assert dequantize(reference, torch.bfloat16) == 14
    return model, reference


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_qlora_under_bf16_autocast_trains_like_the_dequantized_base(method, bnb_cpu):
    model, reference = _mixed_qlora(method)
    ids = _ids(batch=2, length=10)
    grads, losses = [], []
    for m in (model, reference):
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(input_ids=ids, labels=ids)
        assert out.logits.dtype == torch.bfloat16  # the products ran in bf16
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    assert abs(float(losses[0] - losses[1])) < 5e-3 * float(losses[1])
    assert len(grads[0]) == 2 * 7 * 2 and all(g is not None and g.dtype == torch.float32 for g in grads[0])
    for got, want in zip(*grads, strict=True):
        assert _relative(got, want) < 6e-2  # bf16 products; the dequantized weights rounded to bf16 once more
    assert not any(_bnb.is_cpu_packed(m) for m in model.modules())


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("rows", [1, 3])
def test_qlora_under_bf16_autocast_infers_like_the_dequantized_base(method, rows, bnb_cpu):
    """An eval forward without gradients (generation, serving): where bitsandbytes would repack on an AVX-512
    BF16 CPU; one row (a decode step) and several."""
    model, reference = _mixed_qlora(method)
    ids = _ids(batch=rows, length=6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(ids).logits, reference(ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    assert _relative(got, want) < (3e-2 if method == "int8" else 2e-2)  # int8 inference quantizes activations
