"""QLoRA loads quantized (``lorakit.quant.load_quantized``): the same layers and numbers as loading whole and then
quantizing, on both bitsandbytes CPU paths; no float copy of the model ever whole in memory (a memory probe on a
model large enough to tell); the fallback where the files do not map onto the model; clear errors for broken
files; and ``lorakit train`` with ``quantize`` loading this way."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.quant import is_quantized, load_quantized, quantize

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_quantized_equals_loading_whole_then_quantizing(tiny_lm_dir, method, dtype, bnb_cpu):
    model, tokenizer, report = load_quantized(tiny_lm_dir, method, dtype=dtype)
    whole, _ = lorakit.load_model(tiny_lm_dir, dtype=dtype)
    expected = quantize(whole, method, compute_dtype=dtype)
    assert tokenizer is not None
    assert (report.layers, report.bytes_before, report.bytes_after) == (
        expected.layers, expected.bytes_before, expected.bytes_after,
    )  # fmt: skip
    assert [type(m).__name__ for m in model.modules()] == [type(m).__name__ for m in whole.modules()]
    for (name, a), (_, b) in zip(model.state_dict().items(), whole.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert not any(p.is_meta for p in model.parameters())
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_a_tied_head_is_tied_after_loading(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model, _, report = load_quantized(tmp_path, "nf4")
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.weight.is_meta
    assert report.layers == 7


def test_files_that_do_not_map_onto_the_model_fall_back_to_quantizing_after_a_full_load(tmp_path, tiny_lm_dir):
    """A tensor the model lacks (transformers drops it with a warning): loaded whole, then quantized, said so."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_lm_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "model.rotary_emb.extra": torch.zeros(3)}, str(weights), metadata={"format": "pt"})
    said = []
    model, _, report = load_quantized(tmp_path / "m", "nf4", log=said.append)
    assert said == [
        "quantizing after a full load (1 tensors of the files are not the model's parameters, e.g. "
        "model.rotary_emb.extra)"
    ]
    expected, _ = lorakit.load_model(tiny_lm_dir)
    quantize(expected, "nf4")
    assert report.layers == 14 and sum(is_quantized(m) for m in model.modules()) == 14
    for (name, a), (_, b) in zip(model.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_truncated_weight_file_is_named(tmp_path, tiny_lm_dir):
    import shutil

    shutil.copytree(tiny_lm_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* does not fit the file"):
        load_quantized(tmp_path / "m", "nf4")
    weights.write_bytes(b"\xff" * 8 + data[8:100])
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        load_quantized(tmp_path / "m", "nf4")


def test_the_float_weights_are_never_whole_in_memory(tmp_path):
    """A memory probe: a model whose linear weights take 403 MB in bf16 (806 MB in float32) loads quantized
    (nf4, float32 compute) in its own process while its resident memory grows by well under the bf16 size
    (measured: 0.45x); loading whole first, as before, would add at least the bf16 size before quantizing."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=8,
        num_key_value_heads=8, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    from safetensors.torch import save_file

    tensors = {n: torch.randn(p.shape, dtype=torch.bfloat16) * 0.02 for n, p in skeleton.named_parameters()}
    linear_bytes = sum(t.numel() * 2 for n, t in tensors.items() if "proj" in n)
    assert linear_bytes > 400e6
    config.save_pretrained(tmp_path)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    probe = textwrap.dedent(f"""
        import json, torch, bitsandbytes
        from lorakit.models import load_model
        from lorakit.quant import load_quantized
        def kb(field):
            return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
        load_model({str(tmp_path)!r}, skeleton=True)  # the imports and one-time set-up, before the baseline
        before = kb("VmRSS")
        model, _, report = load_quantized({str(tmp_path)!r}, "nf4", dtype=torch.float32)
        print(json.dumps({{"before": before, "peak": kb("VmHWM"), "after": kb("VmRSS"), "layers": report.layers}}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["layers"] == 112
    growth = figures["peak"] - figures["before"]
    # the quantized weights (~1/4 of bf16's bytes), the float32 head and embeddings (2 MB), one layer's float
    # weight and bitsandbytes' temporaries while it quantizes it (~80 MB at 2816 x 1024)
    assert growth < 0.65 * linear_bytes, figures


def test_train_with_quantize_loads_quantized(run_config, tmp_path, capsys, monkeypatch):
    """`lorakit train` with quantize goes through load_quantized (and does not quantize a second time)."""
    from lorakit import quant
    from lorakit.train import trainer

    calls = []
    real = quant.load_quantized

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "load_quantized", spy)
    monkeypatch.setattr(trainer, "quantize", lambda *a, **k: pytest.fail("quantized twice"))
    cfg = run_config("quantize=nf4", "train.max_steps=2", "lora.modules_to_save=[]")
    result = trainer.train(cfg, progress=False)
    assert calls == ["nf4"]
    assert "quantized 14 linear layers to nf4" in capsys.readouterr().err
    assert result.steps == 2 and result.final_loss == result.final_loss  # a number, not NaN
