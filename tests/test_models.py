"""Model loading: argument errors, cache validation, and the embedded default model."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import models

from .hub_cache import offline_hub  # noqa: F401 (a fixture)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_bad_model_spec_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a model: give a local Hugging Face model directory"):
        models.resolve_model_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="the directory has no config.json, so it is not a Hugging Face model"):
        models.resolve_model_dir(tmp_path)
    with pytest.raises(ValueError, match="no such GGUF file"):
        models.resolve_model_dir(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="task 'chat' is unknown"):
        models.load_model(tmp_path, task="chat")


def test_cache_manifest_detects_partial_entries(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    assert not models._cache_complete(entry)  # no manifest: an interrupted conversion
    (entry / "model.safetensors").write_bytes(b"x" * 100)
    (entry / models._MANIFEST).write_text(json.dumps({"files": {"model.safetensors": 100}}))
    assert models._cache_complete(entry)
    (entry / "model.safetensors").write_bytes(b"x" * 50)  # truncated
    assert not models._cache_complete(entry)
    (entry / models._MANIFEST).write_text("{broken")
    assert not models._cache_complete(entry)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"


@pytest.mark.integration
def test_default_model_loads_from_cache():
    models.resolve_model_dir("default")  # converts once if this machine has no cache yet
    started = time.perf_counter()
    model, tokenizer = lorakit.load_model("default")
    assert time.perf_counter() - started < 10
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert tokenizer.chat_template and not model.training
    assert not hasattr(model.config, "quantization_config")
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0])


@pytest.mark.integration
def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README quickstart", "exec"), {"__name__": "__quickstart__"})
    assert (tmp_path / "out" / "quickstart-adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    directory = models.resolve_model_dir("default")
    (directory / "model.safetensors").write_bytes(b"\0" * 10)
    rebuilt = models.resolve_model_dir("default")
    assert rebuilt == directory and models._cache_complete(rebuilt)
    model, _ = models.load_model("default")
    assert model.config.vocab_size == 49152


def test_the_hub_id_names_the_embedded_copy_and_other_ids_go_to_the_hub_cache(tmp_path, monkeypatch, offline_hub):  # noqa: F811
    assert models.DEFAULT_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.is_embedded("default") and models.is_embedded(models.DEFAULT_MODEL_ID)
    assert not models.is_embedded("HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(ValueError, match="SmolLM2-360M-Instruct is not in the Hugging Face cache") as err:
        models.resolve_model_dir("HuggingFaceTB/SmolLM2-360M-Instruct")  # offline, and not in the (empty) cache
    assert str(offline_hub) in str(err.value)
    monkeypatch.chdir(tmp_path)  # a local directory of that name is a local model
    local = tmp_path / models.DEFAULT_MODEL_ID
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    assert not models.is_embedded(models.DEFAULT_MODEL_ID)
    assert models.resolve_model_dir(models.DEFAULT_MODEL_ID) == Path(models.DEFAULT_MODEL_ID)


@pytest.mark.integration
def test_adapters_on_the_embedded_model_record_its_hub_id(tmp_path):
    """Not the machine's cache path: the adapter config and vLLM's serve line name the Hub model, and that
    name loads the embedded copy again."""
    from lorakit.export.vllm import export_vllm

    model, _ = lorakit.load_model("default")
    assert model.name_or_path == model.config.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init="random"))
    directory = lorakit.save_adapter(model, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    line = export_vllm(directory, tmp_path / "vllm").command("mine")
    assert line.startswith("vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora")
    again, _ = lorakit.load_model(config["base_model_name_or_path"])
    lorakit.load_adapter(again, directory)
    assert again.config.vocab_size == 49152 and again.name_or_path == config["base_model_name_or_path"]
