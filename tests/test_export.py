"""`lorakit export --format gguf-lora`: the file llama.cpp reads, its refusals, and parity in llama.cpp itself."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import types
from pathlib import Path

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


def test_parity_needs_a_gguf_base_for_a_hugging_face_model(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    from lorakit.export import orchestrate, parity

    for module in (orchestrate, parity):  # llama.cpp there, as far as the export can tell (the suite may lack it)
        monkeypatch.setattr(module, "missing_runtime", lambda fmt: None)
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
    parity = json.loads((tmp_path / "r.json").read_text())["peft"]
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


# ----- --format gguf (merged) and --format ollama: the files, read back by transformers' GGUF loader -----------
def _reread(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def merged_default(default_adapter):
    """lorakit's adapted embedded model, merged in float32, and a probe batch."""
    model, tokenizer = lorakit.load_model("default")
    lorakit.load_adapter(model, default_adapter)
    ids = torch.tensor([tokenizer("The capital of France is Paris, and the capital of Spain is")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits, ids


@pytest.mark.parametrize("dtype, gap, top1", [("f16", 0.1, 1.0), ("q8_0", 2.5, 0.9)])
def test_merged_gguf_reads_back_in_transformers_like_lorakit(
    default_adapter, merged_default, tmp_path, dtype, gap, top1
):
    from lorakit.models import default_gguf

    out = tmp_path / f"merged-{dtype}.gguf"
    args = ["export", "--adapter", str(default_adapter), "--format", "gguf", "--dtype", dtype, "--out", str(out)]
    assert main([*args, "--no-parity"]) == 0
    fields, _ = _read(out)
    base_fields, _ = _read(default_gguf())
    for key in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre", "llama.block_count"):
        assert str(fields[key]) == str(base_fields[key]), key
    reader = GGUFReader(str(out))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == dtype.upper()
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(
        GGUFReader(str(default_gguf())).fields["tokenizer.ggml.tokens"].data
    )
    expected, ids = merged_default
    with torch.no_grad():
        logits = _reread(out)(input_ids=ids).logits
    # seen: f16 0.04, q8_0 1.2 (on logits spanning about 40), the top-1 token unchanged at every position
    assert (logits - expected).abs().max() < gap
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= top1


def test_merged_gguf_refuses_another_base_and_bad_options(tmp_path, capsys):
    _, _, tiny = _adapter(tmp_path)  # trained on a tiny LLaMA, not the embedded model
    out = tmp_path / "m.gguf"
    base = ["export", "--adapter", str(tiny), "--out", str(out), "--no-parity"]
    assert main([*base, "--format", "gguf"]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert main([*base, "--format", "gguf-lora"]) == 2
    assert "does not fit this base" in capsys.readouterr().err
    assert main([*base, "--format", "gguf-lora", "--dtype", "q8_0"]) == 2
    assert "--dtype 'q8_0' is not available for --format gguf-lora; use one of f32, f16" in capsys.readouterr().err
    assert main([*base, "--format", "gguf", "--merged"]) == 2
    assert "--merged applies to --format ollama" in capsys.readouterr().err
    assert main([*base, "--format", "gguf", "--ollama-layout", "adapter"]) == 2
    assert "--ollama-layout applies to --format ollama, not gguf" in capsys.readouterr().err
    assert main([*base, "--format", "vllm", "--dtype", "f16"]) == 2
    assert "--dtype does not apply to --format vllm" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("m.gguf", ".m.gguf"))]


def test_merged_gguf_checks_the_model_against_the_base_gguf(tmp_path):
    from lorakit.export.gguf_model import export_gguf_model
    from lorakit.models import default_gguf

    model = LlamaForCausalLM(_llama_config())  # a LLaMA, but not the embedded one's shapes
    with pytest.raises(ValueError, match="does not match the base GGUF .* belongs to another base"):
        export_gguf_model(model, default_gguf(), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def _modelfile(path) -> list[tuple[str, str]]:
    """(instruction, argument) pairs, read with the Modelfile syntax Ollama documents: one instruction per line,
    an argument in triple quotes may span lines."""
    text, pairs = path.read_text(), []
    while text.strip():
        text = text.lstrip()
        instruction, _, rest = text.partition(" ")
        if rest.startswith('"""'):
            argument, _, text = rest[3:].partition('"""')
        else:
            argument, _, text = rest.partition("\n")
        pairs.append((instruction, argument))
    return pairs


def _by_instruction(path) -> dict[str, list[str]]:
    by_name: dict[str, list[str]] = {}
    for instruction, argument in _modelfile(path):
        by_name.setdefault(instruction, []).append(argument)
    return by_name


def _assert_smollm_chat(by_name) -> None:
    """The Modelfile's TEMPLATE, SYSTEM and stops for the embedded SmolLM2 (ChatML)."""
    template = by_name["TEMPLATE"][0]
    assert "{{- range .Messages }}<|im_start|>{{ .Role }}" in template and template.endswith("<|im_start|>assistant\n")
    # SmolLM2's chat template adds this system message to chats without one; Ollama gets it as SYSTEM
    assert by_name["SYSTEM"] == ["You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
    assert by_name["PARAMETER"] == ['stop "<|im_start|>"', 'stop "<|im_end|>"']


def test_ollama_directory_is_the_merged_model_by_default(default_adapter, tmp_path, capsys):
    """Ollama 0.34.1 and later reject ADAPTER at `ollama create` (ollama PR 14969): the default layout is one
    merged GGUF under FROM, with no ADAPTER line and no caveat."""
    out = tmp_path / "dates-model"
    args = ["export", "--adapter", str(default_adapter), "--format", "ollama", "--dtype", "q8_0", "--no-parity"]
    assert main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"ollama create dates-model -f {out / 'Modelfile'} && ollama run dates-model" in err
    assert "ADAPTER" not in err and "0.34.1" not in err
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    by_name = _by_instruction(out / "Modelfile")
    assert by_name["FROM"] == ["./model.gguf"] and "ADAPTER" not in by_name
    assert "ADAPTER" not in (out / "Modelfile").read_text()
    fields, _ = _read(out / "model.gguf")
    assert fields["general.type"] == "model" and fields["tokenizer.chat_template"]
    _assert_smollm_chat(by_name)
    (out / "Modelfile").write_text("keep me")
    assert main([*args, "--out", str(out)]) == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "Modelfile").read_text() == "keep me"
    old = tmp_path / "old-flag"  # --merged, the old way to ask for it, still works and writes the same
    assert main([*args, "--out", str(old), "--merged"]) == 0
    assert _snapshot(old) == {**_snapshot(out), "Modelfile": (old / "Modelfile").read_bytes()}
    assert _by_instruction(old / "Modelfile") == by_name
    assert main([*args, "--out", str(tmp_path / "x"), "--merged", "--ollama-layout", "adapter"]) == 2
    assert "--merged and --ollama-layout adapter contradict" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_ollama_adapter_layout_is_an_explicit_choice_with_the_version_caveat(default_adapter, tmp_path, capsys):
    from lorakit.models import default_gguf

    out = tmp_path / "dates-model"
    args = ["export", "--adapter", str(default_adapter), "--format", "ollama", "--out", str(out), "--no-parity"]
    assert main([*args, "--ollama-layout", "adapter"]) == 0
    err = capsys.readouterr().err
    caveat = [line for line in err.splitlines() if "0.34.1" in line]
    assert caveat == [
        "lorakit export: note: Ollama 0.34.1 and later reject ADAPTER in a Modelfile at `ollama create` (ollama PR "
        "14969); for those versions use the default merged layout (--ollama-layout merged)"
    ], err
    assert f"ollama create dates-model -f {out / 'Modelfile'}" in err
    by_name = _by_instruction(out / "Modelfile")
    assert by_name["FROM"] == [f"./{default_gguf().name}"] and by_name["ADAPTER"] == ["./adapter.gguf"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["Modelfile", default_gguf().name, "adapter.gguf"])
    assert (out / default_gguf().name).read_bytes()[:4] == b"GGUF"
    assert _read(out / "adapter.gguf")[0]["general.type"] == "adapter"
    _assert_smollm_chat(by_name)


def test_ollama_template_families_and_default_system(tmp_path):
    from lorakit.export.ollama import default_system, modelfile

    _, tokenizer = lorakit.load_model("default")
    assert default_system(tokenizer) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    tokenizer.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    text, family, stops = modelfile("m.gguf", None, tokenizer)
    assert family == "llama3" and "<|eot_id|>" in stops and "SYSTEM" not in text  # no default system message
    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    text, family, _ = modelfile("m.gguf", None, tokenizer)
    assert family is None and "TEMPLATE" not in text and text.startswith("FROM ./m.gguf\n")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_merged_gguf_answers_alike_in_llama_cpp_and_transformers_and_chats_stop(default_adapter, tmp_path, dtype):
    llama_cpp = pytest.importorskip("llama_cpp")
    import json

    from lorakit.data import chat_prompt_ids

    out, report = tmp_path / f"m-{dtype}.gguf", tmp_path / "r.json"
    args = ["export", "--adapter", str(default_adapter), "--format", "gguf", "--dtype", dtype, "--out", str(out)]
    assert main([*args, "--report", str(report), "--min-agreement", "0.9"]) == 0
    checks = json.loads(report.read_text())
    assert list(checks) == ["llama.cpp", "transformers", "llama.cpp vs transformers"]
    runtimes = checks["llama.cpp vs transformers"]
    # seen (this random adapter, which flattens the model's choices): f16 100 % of tokens and 6 / 6 identical
    # continuations; q8_0 95.3 % and 2 / 6 (llama.cpp multiplies q8_0 weights by 8-bit activations). The trained
    # dates adapter gives the same answers on all 200 held-out dates at q8_0 (README).
    assert runtimes["agreement"] >= (0.98 if dtype == "f16" else 0.9), runtimes
    assert dtype != "f16" or runtimes["sequence_agreement"] >= 5 / 6, runtimes
    assert checks["transformers"]["agreement"] >= 0.95, checks["transformers"]  # the rounding's drift
    # a chat in llama.cpp, rendered with the template in the file and stopped at the end of turn it declares
    model, tokenizer = lorakit.load_model("default")
    lorakit.load_adapter(model, default_adapter)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, verbose=False)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = llm.create_chat_completion(messages=question, max_tokens=96, temperature=0.0)["choices"][0]
    ids = chat_prompt_ids(tokenizer, question)
    with torch.no_grad():
        tokens = model.generate(torch.tensor([ids]), max_new_tokens=96, do_sample=False)[0, len(ids) :].tolist()
    assert tokens[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # lorakit's model ends its turn
    assert reply["finish_reason"] == "stop", reply  # llama.cpp stops at the end of turn too
    if dtype == "f16":  # at q8_0 this random adapter's reply drifts after a few words (seen), but still ends
        assert reply["message"]["content"].strip() == tokenizer.decode(tokens, skip_special_tokens=True).strip()
    llm.close()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("layout", ["adapter", "merged"])
def test_ollama_directory_runs_in_llama_cpp_like_lorakit(default_adapter, tmp_path, layout):
    pytest.importorskip("llama_cpp")
    from lorakit.export import export_adapter

    result = export_adapter(default_adapter, tmp_path / "o", fmt="ollama", ollama_layout=layout, max_prompts=3)
    assert result.unchecked is None and (result.artifact.adapter_file is None) == (layout == "merged")
    assert result.parity.agreement >= 0.9 and result.parity.max_logit_diff < 3.0, result.parity


def test_the_cli_offers_exactly_the_formats_and_types_the_writers_take():
    """The CLI keeps its own copies (so that `lorakit --help` does not import the export stack)."""
    from lorakit.cli import export as cli
    from lorakit.export import FORMATS
    from lorakit.export.gguf_model import TYPES
    from lorakit.export.ollama import LAYOUTS

    assert cli.FORMATS == FORMATS and set(cli.DTYPES) == set(TYPES) and cli.OLLAMA_LAYOUTS == LAYOUTS


# ----- all or nothing: a failed export leaves nothing at --out (issue 34) ---------------------------------------
def _failed_export_args(tiny_lm_dir, tmp_path, fmt: str) -> tuple[list[str], object]:
    """CLI arguments exporting a tiny LLaMA adapter as ``fmt`` (no --out), and the --out to use: a file for
    gguf-lora and gguf, a directory for ollama and vllm. The GGUF base is a tiny real one for a merged export
    (gguf, and ollama's default layout: its tensors must match), any file otherwise (nothing reads it before
    the checks)."""
    _tiny_adapter(tiny_lm_dir, tmp_path / "a")
    base = tmp_path / "base.gguf"
    if fmt in ("gguf", "ollama"):
        _tiny_base_gguf(tiny_lm_dir, base)
    else:
        base.write_bytes(b"GGUF not a real base")
    args = ["export", "--adapter", str(tmp_path / "a"), "--model", str(tiny_lm_dir), "--format", fmt]
    if fmt != "vllm":
        args += ["--base-gguf", str(base)]
    return args, tmp_path / ("out.gguf" if fmt in ("gguf-lora", "gguf") else "out")


def _tiny_base_gguf(tiny_lm_dir, path) -> None:
    """The tiny LLaMA of ``tiny_lm_dir`` as a GGUF with llama.cpp's tensor names: a base a merged export fits."""
    import gguf

    from lorakit.export.gguf_model import _gguf_tensors

    model, _ = lorakit.load_model(tiny_lm_dir)
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, array in _gguf_tensors(model, "llama", True).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _leftovers(tmp_path) -> list[str]:
    """Staged or moved-aside artifacts the export left beside --out."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out"))


def _snapshot(path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) by relative name, with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lorakit export: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


NOT_CHECKED = (
    "lorakit export: parity not checked: llama-cpp-python is not installed (pip install llama-cpp-python, or "
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python on CPUs where the native build crashes); '
    "--require-parity makes this an error"
)


def _assert_loadable(out, fmt: str) -> None:
    """The export at ``out`` is complete: its GGUF file(s) read with the gguf package (a vLLM directory with
    lorakit's adapter reader)."""
    if fmt == "vllm":
        from lorakit.io import read_adapter

        assert read_adapter(out)[1]
        return
    files = {"gguf-lora": [out], "gguf": [out], "ollama": [out / "model.gguf"]}[fmt]
    for file in files:
        fields, tensors = _read(file)
        assert fields["general.type"] == ("adapter" if fmt == "gguf-lora" else "model") and tensors
    if fmt == "ollama":
        assert "ADAPTER" not in (out / "Modelfile").read_text()


@pytest.mark.parametrize("fmt", ["gguf-lora", "gguf", "ollama", "vllm"])
def test_without_the_checks_runtime_the_export_is_written_unchecked_and_says_so(
    tiny_lm_dir, tmp_path, capsys, monkeypatch, fmt
):
    """llama-cpp-python (PEFT for vllm) missing: the export is written exactly as --no-parity writes it, one line
    says parity was not checked and how to get it, the report records "not checked", and the command exits 0."""
    import json

    args, out = _failed_export_args(tiny_lm_dir, tmp_path, fmt)
    module = "peft" if fmt == "vllm" else "llama_cpp"
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, module, None)  # `import llama_cpp` raises ModuleNotFoundError
        assert main([*args, "--out", str(out), "--report", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "parity not checked" in line]
    expected = NOT_CHECKED
    if fmt == "vllm":
        expected = (
            "lorakit export: parity not checked: peft is not installed (pip install peft); --require-parity makes "
            "this an error"
        )
    assert lines == [expected], err
    assert "lorakit export: error" not in err and "Traceback" not in err and "precision:" not in err
    assert out.exists() and not _leftovers(tmp_path)
    _assert_loadable(out, fmt)
    reason = expected.removeprefix("lorakit export: parity not checked: ").split("; --require-parity")[0]
    assert json.loads((tmp_path / "r.json").read_text()) == {"parity": "not checked", "reason": reason}
    unchecked = tmp_path / ("plain.gguf" if out.suffix else "plain")
    assert main([*args, "--out", str(unchecked), "--no-parity"]) == 0
    assert "parity not checked" not in capsys.readouterr().err  # asked for: nothing to warn about
    assert _snapshot(out) == _snapshot(unchecked)  # the same bytes as an export written without the check


@pytest.mark.parametrize("fmt", ["gguf-lora", "gguf", "ollama", "vllm"])
def test_require_parity_without_the_checks_runtime_stops_before_anything_is_written(
    tiny_lm_dir, tmp_path, capsys, monkeypatch, fmt
):
    """--require-parity keeps the strictness of old: one error line, exit 2, nothing written, an existing --out
    untouched; --min-agreement (which needs the figure) does the same."""
    args, out = _failed_export_args(tiny_lm_dir, tmp_path, fmt)
    package = "peft" if fmt == "vllm" else "llama-cpp-python"
    monkeypatch.setitem(sys.modules, "peft" if fmt == "vllm" else "llama_cpp", None)
    assert main([*args, "--out", str(out), "--require-parity"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"lorakit export: error: --require-parity: the parity check cannot run: {package} is not")
    assert f"pip install {package}" in line and line.endswith("nothing was written")
    assert not out.exists() and not _leftovers(tmp_path)
    assert main([*args, "--out", str(out), "--min-agreement", "0.9"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--min-agreement needs the parity check, which cannot run: {package} is not installed" in line
    assert not out.exists() and not _leftovers(tmp_path)
    if out.suffix:  # an existing --out, with --overwrite: left exactly as it was
        out.write_bytes(b"GGUF previous export")
    else:
        out.mkdir()
        (out / "Modelfile").write_text("FROM ./previous.gguf\n")
    before = _snapshot(out)
    assert main([*args, "--out", str(out), "--overwrite", "--require-parity"]) == 2
    assert "--require-parity" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(out) == before and not _leftovers(tmp_path)
    assert main([*args, "--out", str(out), "--require-parity", "--no-parity"]) == 2
    assert "contradict" in _one_error_line(capsys.readouterr().err)


def test_a_merged_gguf_check_needs_transformers_gguf_loader_before_writing(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    from transformers.utils import import_utils

    args, out = _failed_export_args(tiny_lm_dir, tmp_path, "gguf")
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))  # llama.cpp's check could run
    monkeypatch.setattr(import_utils, "is_gguf_available", lambda *a, **k: False)
    assert main([*args, "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "transformers' GGUF loader" in line and "pip install -U 'gguf>=" in line and "--no-parity" in line
    assert not out.exists() and not _leftovers(tmp_path)


def _failing_llama_cpp(monkeypatch) -> list[tuple]:
    """llama-cpp-python stand-in whose model load fails, as a broken file or build makes it; returns the
    (model, adapter) paths it was given and whether they existed then."""
    seen: list[tuple] = []

    class Llama:
        def __init__(self, model_path, lora_path=None, **_):
            files = [Path(p) for p in (model_path, lora_path) if p is not None]
            seen.append((files, all(p.is_file() for p in files)))
            raise RuntimeError(f"llama_decode failed on {lora_path or model_path}")

    module = types.ModuleType("llama_cpp")
    module.Llama, module.__version__ = Llama, "0.0-test"
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    return seen


@pytest.mark.parametrize("fmt", ["gguf-lora", "gguf", "ollama"])
def test_a_check_that_fails_after_writing_leaves_no_export_and_keeps_the_previous_one(
    tiny_lm_dir, tmp_path, capsys, monkeypatch, fmt
):
    args, out = _failed_export_args(tiny_lm_dir, tmp_path, fmt)
    seen = _failing_llama_cpp(monkeypatch)
    nested = tmp_path / "new" / "sub" / out.name  # folders the export creates for --out go again too
    assert main([*args, "--out", str(nested)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"the parity check of {nested} failed" in line and "llama_decode failed on" in line
    assert ".staged-" not in line and ".tmp-" not in line  # the message names --out, not the staged copy
    assert seen and seen[0][1], seen  # the check ran on the complete artifact ...
    assert all(nested not in files for files, _ in seen)  # ... in its staged place, not at --out
    assert not (tmp_path / "new").exists()
    if fmt == "ollama":  # a previous export with --overwrite: left exactly as it was
        out.mkdir()
        (out / "Modelfile").write_text("FROM ./previous.gguf\n")
        (out / "previous.gguf").write_bytes(b"GGUF previous")
    else:
        out.write_bytes(b"GGUF previous export")
    before = _snapshot(out)
    assert main([*args, "--out", str(out), "--overwrite"]) == 2
    assert "the parity check of" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(out) == before and not _leftovers(tmp_path)


def test_a_failing_vllm_check_leaves_nothing_and_a_passing_one_names_out(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    import peft

    args, out = _failed_export_args(tiny_lm_dir, tmp_path, "vllm")

    def broken(*_, **__):
        raise RuntimeError("Error(s) in loading state_dict for LoraModel")

    with monkeypatch.context() as patch:
        patch.setattr(peft.PeftModel, "from_pretrained", broken)  # the check fails after the directory is written
        assert main([*args, "--out", str(out)]) == 2
        assert "loading state_dict for LoraModel" in _one_error_line(capsys.readouterr().err)
        assert not out.exists() and not _leftovers(tmp_path)
        out.mkdir()
        (out / "adapter_config.json").write_text('{"previous": true}')
        assert main([*args, "--out", str(out), "--overwrite"]) == 2
        assert _snapshot(out) == {"adapter_config.json": b'{"previous": true}'} and not _leftovers(tmp_path)
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--overwrite"]) == 0  # checked in its staged place, then moved
    err = capsys.readouterr().err
    assert f"wrote {out} for vLLM" in err and f"--lora-modules out={out}" in err and ".tmp-" not in err
    assert sorted(_snapshot(out)) == ["adapter_config.json", "adapter_model.safetensors"] and not _leftovers(tmp_path)


def test_an_unwritable_report_stops_the_export_before_writing(tiny_lm_dir, tmp_path, capsys):
    args, out = _failed_export_args(tiny_lm_dir, tmp_path, "vllm")
    assert main([*args, "--out", str(out), "--report", str(tmp_path / "missing" / "r.json")]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    assert not out.exists() and not _leftovers(tmp_path)


def test_a_directory_that_cannot_be_moved_into_place_puts_the_previous_one_back(tmp_path, monkeypatch):
    from lorakit.export.files import staged_directory

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    rename = Path.rename

    def failing(self, target):
        if self.name.startswith(".out.tmp-"):  # the new directory's move into place
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with (
        pytest.raises(ValueError, match="cannot write .*out: Invalid cross-device link"),
        staged_directory(out, True) as tmp,
    ):
        (tmp / "new.txt").write_text("new")
    assert _snapshot(out) == {"keep.txt": b"previous"} and not _leftovers(tmp_path)


# ----- --precision: what lorakit's side of the checks computes in (issue 28) ------------------------------------
def test_parity_is_fp32_by_default_and_names_another_precision(tiny_lm_dir, tmp_path, capsys):
    """The default keeps the comparison exact (PEFT's float32 reading within 1e-4); --precision bf16-mixed runs
    lorakit's side on a bfloat16 base under autocast, named in the report, agreeing to bf16 rounding."""
    import json

    _tiny_adapter(tiny_lm_dir, tmp_path / "a")
    args = ["export", "--adapter", str(tmp_path / "a"), "--model", str(tiny_lm_dir), "--format", "vllm"]
    reports = {}
    for precision in ("fp32", "bf16-mixed"):
        extra = [] if precision == "fp32" else ["--precision", precision]
        report = tmp_path / f"{precision}.json"
        assert main([*args, "--out", str(tmp_path / precision), "--report", str(report), *extra]) == 0
        err = capsys.readouterr().err
        assert f"precision: {precision}\n" in err and "parity not checked" not in err
        reports[precision] = json.loads(report.read_text())["peft"]
    assert reports["fp32"]["reference"] == "lorakit" and reports["fp32"]["max_logit_diff"] < 1e-4
    mixed = reports["bf16-mixed"]
    assert mixed["reference"] == "lorakit (bf16-mixed)" and mixed["agreement"] >= 0.9
    assert 0 < mixed["max_logit_diff"] < 0.1
    assert main([*args, "--out", str(tmp_path / "unchecked"), "--no-parity", "--precision", "fp16-mixed"]) == 0
    assert "precision:" not in capsys.readouterr().err  # nothing computed, nothing refused


def test_only_lorakits_side_of_a_check_runs_under_autocast(tiny_lm_dir, tmp_path):
    from lorakit.export import parity_examples
    from lorakit.export.parity import model_parity
    from lorakit.precision import decide

    _tiny_adapter(tiny_lm_dir, tmp_path / "a")
    precision = decide("bf16-mixed", "cpu")
    ours, tokenizer = lorakit.load_model(tiny_lm_dir, dtype=precision.storage)
    lorakit.load_adapter(ours, tmp_path / "a", adapter_dtype=precision.trained)
    other, _ = lorakit.load_model(tiny_lm_dir)
    seen: dict[str, list[bool]] = {"ours": [], "other": []}
    for name, model in (("ours", ours), ("other", other)):
        model.register_forward_pre_hook(lambda *_, name=name: seen[name].append(torch.is_autocast_enabled("cpu")))
    examples = parity_examples(tokenizer, None, 2)
    report = model_parity(ours, examples, other, "float32 model", stop_ids=set(), max_new_tokens=3, precision=precision)
    assert seen["ours"] and all(seen["ours"]) and seen["other"] and not any(seen["other"])
    assert report.reference == "lorakit (bf16-mixed)" and report.tokens == 6


# ----- the base model is loaded once per export (issue 32 item 4) ---------------------------------------------
def _count_loads(monkeypatch) -> list[str]:
    """Every model load during the test, as a list of what it was: ``load_model`` (lorakit's loader, wherever it
    is called from) and any other ``from_pretrained`` of a transformers model (``gguf`` for transformers' reading
    of a written GGUF, which reads the artifact, not the base)."""
    from transformers import PreTrainedModel

    from lorakit import models
    from lorakit.export import orchestrate

    loads: list[str] = []
    real_load, real_pretrained = models.load_model, PreTrainedModel.from_pretrained.__func__
    inside = []

    def load_model(*args, **kwargs):
        loads.append("load_model")
        inside.append(True)
        try:
            return real_load(*args, **kwargs)
        finally:
            inside.pop()

    def from_pretrained(cls, *args, **kwargs):
        if not inside:  # load_model's own from_pretrained is counted once, as load_model
            loads.append("gguf" if kwargs.get("gguf_file") else "from_pretrained")
        return real_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(orchestrate, "load_model", load_model)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    return loads


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_a_checked_vllm_export_loads_the_model_once(tiny_lm_dir, tmp_path, monkeypatch, precision):
    from lorakit.export import export_adapter

    _tiny_adapter(tiny_lm_dir, tmp_path / "a")
    loads = _count_loads(monkeypatch)
    result = export_adapter(
        tmp_path / "a", tmp_path / "v", model=str(tiny_lm_dir), fmt="vllm", max_prompts=2, max_new_tokens=3,
        precision=precision,
    )  # fmt: skip
    assert loads == ["load_model"] and result.parity.tokens == 6, loads
    assert result.parity.max_logit_diff < (1e-4 if precision == "fp32" else 0.1), result.parity
    loads.clear()
    export_adapter(tmp_path / "a", tmp_path / "unchecked", model=str(tiny_lm_dir), fmt="vllm", parity=False)
    assert loads == []  # nothing to compare: no model loaded


def _working_llama_cpp(monkeypatch, vocab: int) -> None:
    """llama-cpp-python stand-in that loads any file and answers the end of generation (token 0) everywhere."""
    import numpy as np

    class Llama:
        def __init__(self, model_path, lora_path=None, n_ctx=64, **_):
            self.metadata, self.n_tokens, self.scores = {}, 0, np.zeros((n_ctx, vocab), dtype=np.float32)

        def token_eos(self):
            return 0

        def reset(self):
            self.n_tokens = 0

        def eval(self, tokens):
            self.n_tokens += len(tokens)

        def close(self):
            pass

    module = types.ModuleType("llama_cpp")
    module.Llama, module.__version__ = Llama, "0.0-test"
    monkeypatch.setitem(sys.modules, "llama_cpp", module)


GGUF_CHECKS = [
    ("gguf-lora", {"with_base": True, "precision": "bf16-mixed"}, {"adapter", "base"}),
    ("ollama", {"ollama_layout": "adapter"}, {"adapter"}),
]


@pytest.mark.parametrize("fmt, options, expected", GGUF_CHECKS)
def test_a_checked_lora_gguf_export_loads_the_model_once(tiny_lm_dir, tmp_path, monkeypatch, fmt, options, expected):
    """The check of the base alone, lorakit's side in another precision, and the adapter layout's tokenizer all
    come from the one load (llama.cpp stands in: what it computes does not matter here)."""
    from transformers import AutoConfig

    from lorakit.export import export_adapter

    _tiny_adapter(tiny_lm_dir, tmp_path / "a")
    (tmp_path / "base.gguf").write_bytes(b"GGUF read by the stand-in alone")
    _working_llama_cpp(monkeypatch, AutoConfig.from_pretrained(tiny_lm_dir).vocab_size)
    loads = _count_loads(monkeypatch)
    out = tmp_path / ("o" if fmt == "ollama" else "x.gguf")
    result = export_adapter(
        tmp_path / "a", out, model=str(tiny_lm_dir), fmt=fmt, base_gguf=tmp_path / "base.gguf", max_prompts=2,
        max_new_tokens=3, **options,
    )  # fmt: skip
    assert loads == ["load_model"], loads
    assert set(result.checks) == expected and result.parity.prompts == 2, result.checks


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(
    "fmt, options, expected",
    [
        *GGUF_CHECKS,
        (
            "gguf",
            {"precision": "bf16-mixed", "dtype": "f16"},
            {"llama.cpp", "transformers", "llama.cpp vs transformers"},
        ),
    ],
)
def test_a_checked_gguf_export_loads_the_model_once_in_llama_cpp(
    default_adapter, tmp_path, monkeypatch, fmt, options, expected
):
    """The same in llama.cpp itself, and for a merged GGUF: lorakit's bf16 side is a copy made before the float32
    merge, and transformers' GGUF loader reads the written file back once (the artifact, not the base)."""
    pytest.importorskip("llama_cpp")
    from lorakit.export import export_adapter

    loads = _count_loads(monkeypatch)
    out = tmp_path / ("o" if fmt == "ollama" else "x.gguf")
    result = export_adapter(default_adapter, out, fmt=fmt, max_prompts=1, max_new_tokens=2, **options)
    assert loads == ["load_model"] + (["gguf"] if fmt == "gguf" else []), loads
    assert set(result.checks) == expected and result.parity.tokens >= 1, result.checks


def test_lorakits_side_in_another_precision_is_what_a_load_in_that_dtype_computes(tiny_lm_dir, tmp_path):
    """The export builds lorakit's bf16 adapted model from its one float32 load by casting: the same logits, bit
    for bit, as the model loaded in bfloat16 with the adapter on it."""
    from lorakit.export.orchestrate import _adapted
    from lorakit.precision import decide

    _tiny_adapter(tiny_lm_dir, tmp_path / "a")
    precision = decide("bf16-mixed", "cpu")
    base, _ = lorakit.load_model(tiny_lm_dir)
    cast = _adapted(base, tmp_path / "a", precision, copied=True)
    loaded, _ = lorakit.load_model(tiny_lm_dir, dtype=precision.storage)
    lorakit.load_adapter(loaded, tmp_path / "a", adapter_dtype=precision.trained)
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad(), precision.context("cpu"):
        assert torch.equal(cast(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert next(base.parameters()).dtype == torch.float32  # the copy was cast, not the base


def test_the_package_only_hands_names_on_and_the_request_takes_the_old_keywords():
    """`import lorakit.export` imports no writer (the names come from their modules when first used), and
    export_adapter's keywords of old map onto an ExportRequest, a misspelt one refused."""
    import subprocess

    code = "import sys, lorakit.export; print(sorted(m for m in sys.modules if m.startswith('lorakit.export')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "['lorakit.export']", run.stdout
    from lorakit.export import ExportRequest, ParityOptions, export_adapter

    request = ExportRequest.of("a", "o", fmt="gguf", dtype="q8_0", parity=False, require_parity=False, max_prompts=3)
    assert request == ExportRequest("a", "o", fmt="gguf", dtype="q8_0", parity=ParityOptions(False, max_prompts=3))
    with pytest.raises(TypeError, match="unexpected keyword argument 'fromat'"):
        export_adapter("a", "o", fromat="gguf")
