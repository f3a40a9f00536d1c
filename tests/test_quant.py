"""QLoRA: a bitsandbytes-quantized base with full-precision LoRA, on CPU."""

import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.cli.main import main as cli_main
from lorakit.quant import dequantize, is_quantized, quantize, requantization_drift

from .conftest import train_lm_steps

pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(seed=0, hidden=128):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


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


def test_merge_refuses_a_quantized_base_and_dequantize_then_merge_is_exact():
    model = _llama()
    quantize(model, "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TARGETS, init="random"))
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


def test_dora_on_a_quantized_base():
    model = _llama()
    quantize(model, "nf4")
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


def test_train_and_merge_cli_with_quantize(tiny_lm_dir, tmp_path, capsys):
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
