"""`lorakit export --format gguf-lora`: the file llama.cpp reads, its refusals, and parity in llama.cpp itself."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from gguf import GGUFReader
from torch.testing import assert_close
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.cli.main import main
from lorakit.export.gguf_lora import _rotary_permute, export_gguf_lora

from .conftest import randomize_adapters


def _llama_config(**kw) -> LlamaConfig:
    settings = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    return LlamaConfig(**{**settings, **kw})


def _adapter(tmp_path, name="a", **lora) -> tuple:
    torch.manual_seed(0)
    config = _llama_config()
    model = LlamaForCausalLM(config)
    settings = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"], **lora}
    lorakit.inject(model, lorakit.LoraConfig(**settings))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / name)
    return config, model, tmp_path / name


def _read(path) -> tuple[dict, dict]:
    reader = GGUFReader(str(path))
    fields = {}
    for key, field in reader.fields.items():
        value = field.parts[field.data[0]] if field.data else None
        fields[key] = bytes(value).decode() if value is not None and value.dtype.name == "uint8" else value
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return fields, tensors


def test_the_file_has_llama_cpps_adapter_layout(tmp_path):
    config, model, adapter = _adapter(tmp_path)
    report = export_gguf_lora(adapter, config, tmp_path / "a.gguf")
    fields, tensors = _read(tmp_path / "a.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and float(fields["adapter.lora.alpha"][0]) == 8.0
    assert report.tensors == 2 * 4 and len(tensors) == 2 * report.tensors
    layer = model.model.layers[1]
    a, b = layer.mlp.down_proj.lora_A["default"].weight, layer.mlp.down_proj.lora_B["default"].weight
    assert_close(tensors["blk.1.ffn_down.weight.lora_a"], a.detach())  # numpy (r, d_in): ggml ne [d_in, r]
    assert_close(tensors["blk.1.ffn_down.weight.lora_b"], b.detach())
    v = layer.self_attn.v_proj.lora_B["default"].weight.detach()
    assert_close(tensors["blk.1.attn_v.weight.lora_b"], v)  # v is not permuted
    for proj, heads in (("q", 4), ("k", 2)):  # q and k rows in llama.cpp's rotary order
        b = getattr(layer.self_attn, f"{proj}_proj").lora_B["default"].weight.detach()
        assert_close(tensors[f"blk.1.attn_{proj}.weight.lora_b"], _rotary_permute(b, heads))
        assert not torch.equal(tensors[f"blk.1.attn_{proj}.weight.lora_b"], b)


def test_rotary_permute_matches_llama_cpps_converter_on_a_weight():
    """The permutation llama.cpp's converter applies to q/k weights (written out independently here)."""
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of dim 4
    heads = 2
    expected = torch.cat([torch.stack([h[:2], h[2:]], dim=1).reshape(4, 3) for h in w.split(4)])
    assert_close(_rotary_permute(w, heads), expected)
    # applying it to B permutes the update B A the same way as the weight: llama.cpp adds B' A to W'
    b, a = torch.randn(8, 2), torch.randn(2, 3)
    assert_close(_rotary_permute(b, heads) @ a, _rotary_permute(b @ a, heads))


@pytest.mark.parametrize(
    "lora",
    [
        {"rank_pattern": {"down_proj": 2}},
        {"alpha_pattern": {"q_proj": 3.0}},
        {"use_rslora": True},
    ],
)
def test_each_layers_scaling_is_folded_into_b_exactly(tmp_path, lora):
    config, model, adapter = _adapter(tmp_path, **lora)
    export_gguf_lora(adapter, config, tmp_path / "a.gguf", dtype="f32")
    fields, tensors = _read(tmp_path / "a.gguf")
    alpha = float(fields["adapter.lora.alpha"][0])
    for i, layer in enumerate(model.model.layers):
        for path, name in (("mlp.down_proj", "ffn_down"), ("self_attn.v_proj", "attn_v")):
            wrapper = layer.get_submodule(path)
            a, b = tensors[f"blk.{i}.{name}.weight.lora_a"], tensors[f"blk.{i}.{name}.weight.lora_b"]
            llama_cpp_delta = (alpha / a.shape[0]) * b @ a  # what llama.cpp adds: alpha / r * B A
            assert_close(llama_cpp_delta, wrapper.delta_weight("default"), rtol=1e-5, atol=1e-6)


def test_f16_halves_the_file(tmp_path):
    config, _, adapter = _adapter(tmp_path)
    f32 = export_gguf_lora(adapter, config, tmp_path / "32.gguf")
    f16 = export_gguf_lora(adapter, config, tmp_path / "16.gguf", dtype="f16")
    assert f16.bytes < 0.6 * f32.bytes
    assert _read(tmp_path / "16.gguf")[1]["blk.0.attn_q.weight.lora_a"].dtype == torch.float16


def test_refusals_name_the_problem_and_leave_no_file(tmp_path, capsys):
    config, _, adapter = _adapter(tmp_path)
    _, _, dora = _adapter(tmp_path, "dora", use_dora=True)
    _, _, saved = _adapter(tmp_path, "saved", modules_to_save=["lm_head"])
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="DoRA adapter.*Merge it into the base"):
        export_gguf_lora(dora, config, out)
    with pytest.raises(ValueError, match="cannot carry.*modules_to_save"):
        export_gguf_lora(saved, config, out)
    gpt2 = GPT2Config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="supports the base architectures LlamaForCausalLM, MistralForCausalLM"):
        export_gguf_lora(adapter, gpt2, out)
    with pytest.raises(ValueError, match="--dtype 'q4' is not available"):
        export_gguf_lora(adapter, config, out, dtype="q4")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.gguf")]
    out.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        export_gguf_lora(adapter, config, out)
    assert out.read_bytes() == b"keep me"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="cannot write"):
            export_gguf_lora(adapter, config, locked / "a.gguf")
    code = main(
        ["export", "--adapter", str(dora), "--model", str(tmp_path), "--format", "gguf-lora", "--out", str(out)]
    )
    assert code == 2 and "lorakit export: error:" in capsys.readouterr().err


def test_parity_needs_a_gguf_base_for_a_hugging_face_model(tiny_lm_dir, tmp_path, capsys):
    model, _ = lorakit.load_model(tiny_lm_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    args = ["export", "--adapter", str(tmp_path / "a"), "--model", str(tiny_lm_dir), "--format", "gguf-lora"]
    assert main([*args, "--out", str(tmp_path / "a.gguf")]) == 2
    assert "pass --base-gguf FILE" in capsys.readouterr().err and not (tmp_path / "a.gguf").exists()
    assert main([*args, "--out", str(tmp_path / "a.gguf"), "--no-parity"]) == 0
    assert (tmp_path / "a.gguf").is_file()


# ----- in llama.cpp itself (slow: llama-cpp-python compiles from source; `make test-slow` installs it) --------
@pytest.fixture(scope="module")
def default_adapter(tmp_path_factory):
    """An adapter with visible random updates on every projection of the embedded model."""
    model, _ = lorakit.load_model("default")
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=targets))
    randomize_adapters(model, seed=3, scale=0.06)
    directory = tmp_path_factory.mktemp("export") / "adapter"
    lorakit.save_adapter(model, directory)
    return directory


@pytest.mark.slow
@pytest.mark.integration
def test_llama_cpp_runs_the_exported_adapter_over_the_original_q4_1_base_like_lorakit(default_adapter, tmp_path):
    pytest.importorskip("llama_cpp")
    import json

    out, report = tmp_path / "adapter.gguf", tmp_path / "parity.json"
    args = ["export", "--adapter", str(default_adapter), "--format", "gguf-lora", "--out", str(out)]
    assert main([*args, "--report", str(report), "--with-base", "--min-agreement", "0.9"]) == 0
    parity = json.loads(report.read_text())
    adapter, base = parity["adapter"], parity["base"]
    # seen: 97.4 % of 76 tokens, logit gap 2.1; the base alone 96.4 %, 1.9 (Q4_1 x 8-bit products vs float32)
    assert adapter["prompts"] == 6 and adapter["agreement"] >= 0.9 and adapter["tokens"] > 30, adapter
    assert adapter["max_logit_diff"] < 3.0, adapter
    assert base["agreement"] >= 0.9 and base["max_logit_diff"] < 3.0, base
    assert main([*args, "--min-agreement", "1.01"]) == 2  # out of range: one clear error


@pytest.mark.slow
@pytest.mark.integration
def test_without_the_rotary_permutation_llama_cpp_disagrees(default_adapter, tmp_path, monkeypatch):
    """The check catches a wrong export: q/k B matrices left in transformers' row order."""
    pytest.importorskip("llama_cpp")
    from lorakit.export import export_adapter, gguf_lora

    good = export_adapter(default_adapter, tmp_path / "good.gguf").parity
    monkeypatch.setattr(gguf_lora, "_rotary_permute", lambda rows, heads: rows)
    bad = export_adapter(default_adapter, tmp_path / "bad.gguf").parity
    # seen: 80.3 % and a logit gap of 12.4, against 97.4 % and 2.1
    assert bad.agreement < good.agreement - 0.1 and bad.max_logit_diff > 3 * good.max_logit_diff, (good, bad)


# ----- --format vllm ------------------------------------------------------------------------------------------
def _tiny_adapter(tiny_lm_dir, directory, **lora):
    model, _ = lorakit.load_model(tiny_lm_dir)
    torch.manual_seed(1)
    lorakit.inject(
        model, lorakit.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora})
    )
    randomize_adapters(model, seed=2, scale=0.3)
    lorakit.save_adapter(model, directory)
    return model


def test_vllm_export_folds_per_layer_ranks_and_scalings_exactly(tiny_lm_dir, tmp_path, capsys):
    import json

    lora = {"rank_pattern": {"down_proj": 8}, "alpha_pattern": {"v_proj": 3.0}, "use_rslora": True}
    original = _tiny_adapter(tiny_lm_dir, tmp_path / "a", **lora)
    args = ["export", "--adapter", str(tmp_path / "a"), "--model", str(tiny_lm_dir), "--format", "vllm"]
    assert (
        main([*args, "--out", str(tmp_path / "v"), "--report", str(tmp_path / "r.json"), "--min-agreement", "1"]) == 0
    )
    err = capsys.readouterr().err
    assert "padded every layer to rank 8" in err and "folded each layer's scaling" in err
    assert "--enable-lora --max-lora-rank 8 --lora-modules v=" in err
    written = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert written["r"] == 8 and not written["rank_pattern"] and not written["alpha_pattern"]
    assert written["use_rslora"] is False and written["lora_alpha"] == 8
    parity = json.loads((tmp_path / "r.json").read_text())["adapter"]
    assert parity["agreement"] == 1.0 and parity["max_logit_diff"] < 1e-4, parity  # PEFT reads it as vLLM does
    reloaded, _ = lorakit.load_model(tiny_lm_dir)  # and lorakit reads the plain rank-8 adapter the same
    lorakit.load_adapter(reloaded, tmp_path / "v")
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(reloaded(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"use_dora": True}, "DoRA \\(vLLM does not support it\\): merge"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save \\['lm_head'\\] \\(vLLM serves LoRA A/B only\\)"),
        ({"bias": "lora_only"}, "bias='lora_only' \\(vLLM does not load adapter biases\\)"),
        ({"r": 520}, "rank 520 exceeds vLLM's largest --max-lora-rank 512; retrain with a lower r, or merge"),
    ],
)
def test_vllm_export_refuses_what_vllm_refuses(tiny_lm_dir, tmp_path, lora, message):
    from lorakit.export.vllm import export_vllm

    with pytest.warns(UserWarning) if lora.get("r", 0) > 32 else contextlib.nullcontext():
        _tiny_adapter(tiny_lm_dir, tmp_path / "a", **lora)
    with pytest.raises(ValueError, match=message):
        export_vllm(tmp_path / "a", tmp_path / "v")
    assert not (tmp_path / "v").exists() and not list(tmp_path.glob(".v.*"))


def test_vllm_export_keeps_an_existing_directory_without_overwrite(tiny_lm_dir, tmp_path):
    from lorakit.export.vllm import export_vllm

    _tiny_adapter(tiny_lm_dir, tmp_path / "a")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        export_vllm(tmp_path / "a", tmp_path / "v")
    assert (tmp_path / "v" / "mine.txt").read_text() == "keep"
    result = export_vllm(tmp_path / "a", tmp_path / "v", overwrite=True)
    assert result.fixes == [] and result.max_lora_rank == 8 and not (tmp_path / "v" / "mine.txt").exists()
