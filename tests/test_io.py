"""Adapter files: PEFT's layout, interop with PEFT both ways, and every bad input refused cleanly."""

import json
import os
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import lorakit
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from lorakit.layers import LoraLayer

from .conftest import FAMILIES, randomize_adapters


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _lorakit_config(family, **overrides):
    kw = {
        "r": 4,
        "alpha": 8.0,
        "target_modules": family.targets,
        "rank_pattern": family.rank_pattern,
        "alpha_pattern": family.alpha_pattern,
        "use_rslora": family.name in ("llama", "t5"),
        "modules_to_save": family.modules_to_save,
        "init": "random",
    }
    kw.update(overrides)
    return lorakit.LoraConfig(**kw)


def _trained_lorakit(family, tmp_path):
    model = family.build()
    lorakit.inject(model, _lorakit_config(family))
    randomize_adapters(model)
    if family.modules_to_save:
        with torch.no_grad():
            model.classifier.modules_to_save["default"].weight.normal_()
    lorakit.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_files_have_peft_layout(tmp_path):
    family = FAMILIES["llama"]
    _, directory = _trained_lorakit(family, tmp_path)
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is True and config["rank_pattern"] == family.rank_pattern
    assert config["task_type"] == "CAUSAL_LM"
    tensors = load_file(directory / WEIGHTS_NAME)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, 16)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (16, 2)
    assert len(tensors) == 2 * 7 * 2
    assert not list(directory.glob(".*tmp*"))


def test_roundtrip_reproduces_outputs(family, tmp_path):
    model, directory = _trained_lorakit(family, tmp_path)
    want = family.logits(model)
    fresh = family.build()
    lorakit.load_adapter(fresh, directory)
    assert_close(family.logits(fresh), want, rtol=0, atol=0)
    assert not any(p.requires_grad for p in fresh.parameters())
    again = lorakit.load_adapter(family.build(), directory, name="x", trainable=True)
    assert any(p.requires_grad for n, p in again.named_parameters() if ".x." in n)


def test_a_bf16_adapter_is_saved_in_float32_and_loads_in_the_adapter_dtype(tmp_path):
    """Saved adapters are float32 whatever the training dtype: a bf16 adapter (adapter_dtype="base") and its
    modules_to_save copy are widened exactly. Loading gives the adapter dtype, not the file's."""
    family = FAMILIES["llama"]
    model = family.build(dtype=torch.bfloat16)
    lorakit.inject(model, _lorakit_config(family, modules_to_save=["lm_head"]), adapter_dtype="base")
    randomize_adapters(model)
    live = lorakit.io.adapter_tensors(model, "default")
    assert {t.dtype for t in live.values()} == {torch.bfloat16}
    lorakit.save_adapter(model, tmp_path / "bf16")
    saved = load_file(tmp_path / "bf16" / WEIGHTS_NAME)
    assert saved.keys() == live.keys() and "base_model.model.lm_head.weight" in saved
    for key, tensor in saved.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, live[key].float()), key
    want = family.logits(model)
    for adapter_dtype, expected in ((None, torch.float32), ("base", torch.bfloat16), (torch.float64, torch.float64)):
        fresh = lorakit.load_adapter(family.build(dtype=torch.bfloat16), tmp_path / "bf16", adapter_dtype=adapter_dtype)
        loaded = lorakit.io.adapter_tensors(fresh, "default")
        assert {t.dtype for t in loaded.values()} == {expected}
        assert all(torch.equal(loaded[k].float(), saved[k]) for k in saved)
        assert fresh.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
        if adapter_dtype == "base":
            assert torch.equal(family.logits(fresh), want)
        else:  # the update in the wider dtype, rounded once at the end
            assert_close(family.logits(fresh).float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_load_adapter_refuses_an_invalid_adapter_dtype_before_anything_changes(tmp_path):
    family = FAMILIES["llama"]
    _, directory = _trained_lorakit(family, tmp_path)
    model = family.build()
    with pytest.raises(ValueError, match="adapter_dtype='half' is invalid"):
        lorakit.load_adapter(model, directory, adapter_dtype="half")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_lorakit_adapter_loads_in_peft(family, tmp_path):
    model, directory = _trained_lorakit(family, tmp_path)
    want = family.logits(model)
    assert not torch.allclose(want, family.logits(family.build()), atol=1e-3)  # the adapter matters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(family.build(), str(directory)).eval()
    assert_close(family.logits(peft_model), want, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_lorakit(family, tmp_path):
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=family.targets,
        rank_pattern=family.rank_pattern,
        alpha_pattern=family.alpha_pattern,
        use_rslora=family.name in ("gpt2", "bert"),
        modules_to_save=family.modules_to_save,
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(family.build(), cfg).eval()
        if family.modules_to_save:
            with torch.no_grad():
                peft_model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
        want = family.logits(peft_model)
        peft_model.save_pretrained(str(tmp_path / "peft"))
    assert not torch.allclose(want, family.logits(family.build()), atol=1e-3)
    fresh = family.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's own config keys must not warn
        lorakit.load_adapter(fresh, tmp_path / "peft")
    assert_close(family.logits(fresh), want, rtol=1e-5, atol=1e-5)


def test_peft_all_linear_and_embedding_adapters_load(tmp_path):
    family = FAMILIES["llama"]
    cfg = peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(family.build(), cfg).eval()
        want = family.logits(peft_model)
        peft_model.save_pretrained(str(tmp_path / "emb"))
    fresh = lorakit.load_adapter(family.build(), tmp_path / "emb")  # includes PEFT's copy of the base embedding
    assert_close(family.logits(fresh), want, rtol=1e-5, atol=1e-5)

    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear", init="random"))
    lorakit.save_adapter(model, tmp_path / "all")
    assert len(json.loads((tmp_path / "all" / CONFIG_NAME).read_text())["target_modules"]) == 14
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(family.build(), str(tmp_path / "all")).eval()
    assert_close(family.logits(back), family.logits(model), rtol=1e-5, atol=1e-5)


def test_save_overwrites_adapter_files_only(tmp_path):
    family = FAMILIES["llama"]
    model, directory = _trained_lorakit(family, tmp_path)
    (directory / "README.md").write_text("mine")
    randomize_adapters(model, seed=9)
    lorakit.save_adapter(model, directory)
    assert (directory / "README.md").read_text() == "mine"
    fresh = lorakit.load_adapter(family.build(), directory)
    assert_close(family.logits(fresh), family.logits(model), rtol=0, atol=0)


def test_failed_save_keeps_previous_files(tmp_path, monkeypatch):
    family = FAMILIES["llama"]
    model, directory = _trained_lorakit(family, tmp_path)
    before = _snapshot(directory)
    randomize_adapters(model, seed=9)
    real_open = open
    calls = {"n": 0}

    def failing_open(path, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp-" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:  # the second temporary file: weights written, config not
                raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match="No space left on device; files already there are unchanged"):
        lorakit.save_adapter(model, directory)
    monkeypatch.undo()
    assert _snapshot(directory) == before


def test_save_to_a_file_path_is_refused(tmp_path):
    model, _ = _trained_lorakit(FAMILIES["llama"], tmp_path)
    target = tmp_path / "file.txt"
    target.write_text("keep")
    with pytest.raises(ValueError, match="it is a file, not a directory"):
        lorakit.save_adapter(model, target)
    assert target.read_text() == "keep"


# ----- bad inputs: a clear error, the model unchanged, nothing on disk changed ---------------------------
def _assert_untouched(model, base_logits, family):
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(family.logits(model), base_logits)


def _load_error(tmp_path, directory, match):
    family = FAMILIES["llama"]
    model = family.build()
    model.requires_grad_(True)
    base = family.logits(model)
    before = _snapshot(directory) if directory.is_dir() else None
    with pytest.raises(ValueError, match=match) as err:
        lorakit.load_adapter(model, directory)
    _assert_untouched(model, base, family)
    if before is not None:
        assert _snapshot(directory) == before
    return str(err.value)


def test_shape_mismatch_names_first_key_and_both_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    lorakit.inject(other, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    lorakit.save_adapter(other, tmp_path / "wide")
    msg = _load_error(tmp_path, tmp_path / "wide", "does not fit this model")
    first = msg.splitlines()[1]
    assert "shape mismatch at base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in first
    assert "file has (4, 32), model expects (4, 16)" in first


def test_missing_and_unexpected_keys_are_all_listed(tmp_path):
    _, directory = _trained_lorakit(FAMILIES["llama"], tmp_path)
    tensors = load_file(directory / WEIGHTS_NAME)
    tensors.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    tensors["base_model.model.model.layers.0.self_attn.zz.lora_A.weight"] = torch.zeros(2, 2)
    save_file(tensors, directory / WEIGHTS_NAME)
    msg = _load_error(tmp_path, directory, "2 problem")
    assert "missing key base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in msg
    assert "unexpected key base_model.model.model.layers.0.self_attn.zz.lora_A.weight" in msg


def test_missing_config(tmp_path):
    _, directory = _trained_lorakit(FAMILIES["llama"], tmp_path)
    (directory / CONFIG_NAME).unlink()
    _load_error(tmp_path, directory, "adapter_config.json is missing")


def test_missing_directory(tmp_path):
    _load_error(tmp_path, tmp_path / "nope", "does not exist")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, damage):
    _, directory = _trained_lorakit(FAMILIES["llama"], tmp_path)
    path = directory / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(300), "empty": b""}[damage])
    _load_error(tmp_path, directory, "not a readable safetensors file .*truncated or corrupt")


def test_pickle_is_never_unpickled(tmp_path):
    _, directory = _trained_lorakit(FAMILIES["llama"], tmp_path)
    (directory / WEIGHTS_NAME).unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (directory / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    msg = _load_error(tmp_path, directory, "adapter_model.bin, a pickle file")
    assert "never unpickles" in msg
    assert not marker.exists()


def test_non_finite_weights_are_refused(tmp_path):
    _, directory = _trained_lorakit(FAMILIES["llama"], tmp_path)
    tensors = load_file(directory / WEIGHTS_NAME)
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, directory / WEIGHTS_NAME)
    _load_error(tmp_path, directory, "contains NaN or infinite values")


def test_invalid_json_and_bad_values(tmp_path):
    _, directory = _trained_lorakit(FAMILIES["llama"], tmp_path)
    cfg_path = directory / CONFIG_NAME
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    _load_error(tmp_path, directory, "is not valid JSON")
    cfg_path.write_text(json.dumps({**good, "r": 0}))
    _load_error(tmp_path, directory, "adapter_config.json: r=0 is invalid")
    cfg_path.write_text(json.dumps({**good, "lora_bias": True}))
    _load_error(tmp_path, directory, "lora_bias=True uses a PEFT feature lorakit does not support")
    cfg_path.write_text(json.dumps({**good, "use_dora": True}))  # DoRA without its magnitude vectors
    _load_error(tmp_path, directory, "lora_magnitude_vector")
    cfg_path.write_text(json.dumps({**good, "peft_type": "IA3"}))
    _load_error(tmp_path, directory, "lorakit loads LoRA adapters only")


def test_unknown_config_keys_warn_and_load(tmp_path):
    family = FAMILIES["llama"]
    model, directory = _trained_lorakit(family, tmp_path)
    cfg_path = directory / CONFIG_NAME
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "shiny_new_option": 3}))
    with pytest.warns(UserWarning, match="ignoring config keys lorakit does not know: shiny_new_option"):
        fresh = lorakit.load_adapter(family.build(), directory)
    assert_close(family.logits(fresh), family.logits(model), rtol=0, atol=0)


def test_unknown_config_keys_left_unset_load_quietly(recwarn):
    """A newer PEFT writes keys for features it added (astra_config in 0.22), null when unused: nothing to warn
    about; the same key set to a value still warns."""
    from lorakit.io import config_from_peft_dict

    config_from_peft_dict({"r": 2, "target_modules": ["q"], "astra_config": None, "future_flag": False}, "a.json")
    assert [str(w.message) for w in recwarn] == []
    with pytest.warns(UserWarning, match="does not know: future_config$"):
        config_from_peft_dict({"r": 2, "target_modules": ["q"], "future_config": {"k": 1}}, "a.json")


def test_adapter_for_another_architecture(tmp_path):
    model = FAMILIES["t5"].build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q", "v"]))
    lorakit.save_adapter(model, tmp_path / "t5")
    _load_error(tmp_path, tmp_path / "t5", "does not fit this model")


def test_load_with_name_in_use(tmp_path):
    family = FAMILIES["llama"]
    _, directory = _trained_lorakit(family, tmp_path)
    model = lorakit.load_adapter(family.build(), directory)
    with pytest.raises(ValueError, match="'default' is already in use"):
        lorakit.load_adapter(model, directory)
    lorakit.load_adapter(model, directory, name="second")
    assert lorakit.active_adapters(model) == ["second"]


def test_a_config_claiming_a_huge_rank_is_refused_before_anything_is_allocated(tmp_path):
    """A fuzzed r of 20 million once made loading allocate about 9 GB before the shapes were compared."""
    _, directory = _trained_lorakit(FAMILIES["llama"], tmp_path)
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["r"] = 20_000_000
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    msg = _load_error(tmp_path, directory, "the config gives rank 20000000, the file's A is")
    assert "nothing was loaded" in msg


def test_an_adapter_on_a_tied_head_is_refused_on_load(tmp_path):
    """A PEFT adapter may target lm_head; on a base whose head is tied to the embedding it is refused, as inject
    refuses it, before anything is added."""
    from transformers import GPT2Config, GPT2LMHeadModel

    untied = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                        tie_word_embeddings=False))  # fmt: skip
    lorakit.inject(untied, lorakit.LoraConfig(r=2, target_modules=["c_attn", "lm_head"], init="random"))
    directory = lorakit.save_adapter(untied, tmp_path / "head")
    tied = FAMILIES["gpt2"].build()
    with pytest.raises(ValueError, match=r"does not fit this model: cannot add LoRA to lm_head: its weight is tied"):
        lorakit.load_adapter(tied, directory)
    assert not any(isinstance(m, LoraLayer) for m in tied.modules())


def test_a_local_model_records_its_directory(tiny_lm_dir, tmp_path):
    model, _ = lorakit.load_model(tiny_lm_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    config = json.loads((lorakit.save_adapter(model, tmp_path / "a") / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == str(tiny_lm_dir)
