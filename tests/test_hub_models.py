"""Models by their Hugging Face Hub id, tested offline against a cache on disk in the Hub's own layout."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
import torch

import lorakit
from lorakit import hub, models
from lorakit.cli.main import main
from lorakit.io import base_model_of

from .conftest import colour_rows, randomize_adapters, write_jsonl
from .hub_cache import add_repo, model_files, offline_hub  # noqa: F401 (offline_hub is a fixture)

REPO = "acme/tiny-lm"


@pytest.fixture
def cached(offline_hub, tiny_lm_dir, steerable_lm_dir):  # noqa: F811
    """The tiny LLaMA stored in the offline cache as acme/tiny-lm (main), and other weights as its tag v2."""
    commit = add_repo(offline_hub, REPO, model_files(tiny_lm_dir))
    v2 = add_repo(offline_hub, REPO, model_files(steerable_lm_dir), ref="v2", seed="v2")
    return {"cache": offline_hub, "commit": commit, "v2": v2, "dirs": {commit: tiny_lm_dir, v2: steerable_lm_dir}}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits


@pytest.mark.parametrize(
    "spec, revision",
    [("acme/tiny-lm", "commit"), ("acme/tiny-lm@main", "commit"), ("acme/tiny-lm@v2", "v2"), ("@commit", "commit")],
)
def test_a_cached_model_loads_by_id_and_revision_offline(cached, spec, revision):
    if spec == "@commit":
        spec = f"{REPO}@{cached['commit']}"
    directory = models.resolve_model_dir(spec)
    assert directory == cached["cache"] / "models--acme--tiny-lm" / "snapshots" / cached[revision]
    model, tokenizer = lorakit.load_model(spec)
    assert model.name_or_path == REPO and model.config._commit_hash == cached[revision]
    assert tokenizer is not None and tokenizer.chat_template
    reference, _ = lorakit.load_model(cached["dirs"][cached[revision]])
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


def test_the_adapter_records_the_hub_base_and_its_commit_and_peft_finds_it_again(cached, tmp_path):
    model, _ = lorakit.load_model(f"{REPO}@v2")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="random"))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO and config["revision"] == cached["v2"]
    assert base_model_of(tmp_path / "a") == f"{REPO}@{cached['v2']}"
    from peft import AutoPeftModelForCausalLM

    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a")  # the base from the cache, offline
    torch.testing.assert_close(_logits(peft_model), _logits(model), rtol=1e-5, atol=1e-5)  # v2's weights, not main's
    main_model, _ = lorakit.load_model(REPO)
    assert not torch.allclose(_logits(main_model), _logits(peft_model), atol=1e-3)


def test_a_local_directory_keeps_its_path_as_the_name_and_records_no_revision(tiny_lm_dir, tmp_path):
    model, _ = lorakit.load_model(tiny_lm_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    assert base_model_of(tmp_path / "a") == str(tiny_lm_dir)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["revision"] is None


def test_an_id_missing_from_the_cache_offline_is_one_line_naming_it_and_the_fix(cached, capsys):
    with pytest.raises(ValueError) as err:
        models.resolve_model_dir("acme/not-cached")
    message = str(err.value)
    assert "acme/not-cached" in message and "HF_HUB_OFFLINE=1" in message and "hf download acme/not-cached" in message
    assert str(cached["cache"]) in message and "local model directory" in message
    assert main(["generate", "--model", "acme/not-cached@v9", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "acme/not-cached@v9 is not in the Hugging Face cache" in err and "Traceback" not in err
    )


def test_without_a_network_a_cached_model_still_loads_and_a_missing_one_says_the_hub_is_unreachable(
    cached, monkeypatch
):
    import huggingface_hub.constants as constants

    from .conftest import free_port

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert models.resolve_model_dir(REPO) == cached["cache"] / "models--acme--tiny-lm" / "snapshots" / cached["commit"]
    with pytest.raises(ValueError, match="acme/elsewhere is not in the Hugging Face cache .* the Hugging Face Hub "
                                         "cannot be reached"):  # fmt: skip
        models.resolve_model_dir("acme/elsewhere")


class _RefusingHub(http.server.BaseHTTPRequestHandler):
    """The Hub's answers to a repo this account may not read: gated (403, X-Error-Code GatedRepo) or not found."""

    def do_GET(self):
        gated = "gated" in self.path
        self.send_response(403 if gated else 401)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access to this repo is restricted" if gated else "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_hub(offline_hub, monkeypatch):  # noqa: F811
    import huggingface_hub.constants as constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()


def test_a_gated_or_private_repo_is_one_line_about_access_and_the_token(refusing_hub):
    with pytest.raises(ValueError) as err:
        models.resolve_model_dir("acme/gated-model")
    assert "acme/gated-model is gated" in str(err.value) and "hf auth login" in str(err.value)
    assert "HF_TOKEN" in str(err.value)
    with pytest.raises(ValueError) as err:
        models.resolve_model_dir("acme/private-model")
    assert "acme/private-model is neither a local directory nor a repo" in str(err.value)
    assert "HF_TOKEN" in str(err.value)


def test_a_repo_with_only_pickled_weights_is_refused_with_the_reason(offline_hub, tiny_lm_dir):  # noqa: F811
    files = {n: p for n, p in model_files(tiny_lm_dir).items() if not n.endswith(".safetensors")}
    add_repo(offline_hub, "acme/pickled", {**files, "pytorch_model.bin": b"\x80\x04 not loaded"})
    with pytest.raises(ValueError) as err:
        models.resolve_model_dir("acme/pickled")
    message = str(err.value)
    assert "only pickled weights (pytorch_model.bin)" in message and "arbitrary code" in message
    assert "safetensors" in message


def test_a_gguf_file_in_a_hub_repo_is_converted_like_a_local_one(offline_hub, monkeypatch, tiny_lm_dir):  # noqa: F811
    commit = add_repo(offline_hub, "acme/tiny-GGUF", {"tiny-Q8_0.gguf": b"GGUF stand-in", "README.md": b"#"})
    converted = []
    monkeypatch.setattr(models, "convert_gguf", lambda path, force=False: converted.append(path) or tiny_lm_dir)
    assert models.resolve_model_dir("acme/tiny-GGUF:tiny-Q8_0.gguf") == tiny_lm_dir
    assert converted[0] == offline_hub / "models--acme--tiny-GGUF" / "snapshots" / commit / "tiny-Q8_0.gguf"
    assert converted[0].read_bytes() == b"GGUF stand-in"
    model, _ = lorakit.load_model(f"acme/tiny-GGUF@{commit}:tiny-Q8_0.gguf")
    assert model.name_or_path == f"acme/tiny-GGUF@{commit}:tiny-Q8_0.gguf"
    with pytest.raises(ValueError, match="acme/tiny-GGUF .file other.gguf. is not in the Hugging Face cache"):
        models.resolve_model_dir("acme/tiny-GGUF:other.gguf")


def test_a_gguf_only_repo_named_without_its_file_says_which_file_to_name(offline_hub):  # noqa: F811
    add_repo(offline_hub, "acme/only-GGUF", {"model-f16.gguf": b"GGUF", "config.json": b"{}"})
    with pytest.raises(ValueError, match="no .safetensors weights; it holds GGUF files: name one as "
                                         "acme/only-GGUF:model-f16.gguf"):  # fmt: skip
        models.resolve_model_dir("acme/only-GGUF")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("org/name", hub.HubModel("org/name")),
        ("org/name@v1.0", hub.HubModel("org/name", "v1.0")),
        ("org/name:f.gguf", hub.HubModel("org/name", None, "f.gguf")),
        ("org/name@refs/pr/3:sub/f-Q4_K_M.gguf", hub.HubModel("org/name", "refs/pr/3", "sub/f-Q4_K_M.gguf")),
        ("./org/name", None),
        ("/abs/path", None),
        ("a/b/c", None),
        ("name-only", None),
        ("model.gguf", None),
    ],
)
def test_model_specs_parse_into_repo_revision_and_file(spec, expected):
    assert hub.parse(spec) == expected


def test_an_existing_local_path_wins_over_a_hub_id(tmp_path, monkeypatch, tiny_lm_dir):
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "tiny-lm").symlink_to(tiny_lm_dir)
    monkeypatch.chdir(tmp_path)
    assert hub.parse("acme/tiny-lm") is None
    assert models.resolve_model_dir("acme/tiny-lm") == models.Path("acme/tiny-lm")


def test_the_embedded_id_without_a_revision_needs_no_network(offline_hub):  # noqa: F811
    assert models.is_embedded(models.DEFAULT_MODEL_ID)
    assert not models.is_embedded(f"{models.DEFAULT_MODEL_ID}@main")  # the Hub's: resolved through the cache
    with pytest.raises(ValueError, match="HuggingFaceTB/SmolLM2-135M-Instruct@main is not in the Hugging Face cache"):
        models.resolve_model_dir(f"{models.DEFAULT_MODEL_ID}@main")


def test_every_command_takes_a_hub_id_offline(cached, tmp_path, capsys, monkeypatch):
    """train, eval, generate (the base from the adapter), merge, export, combine, inspect, serve, bench, compare
    and the dashboard's form: each loads acme/tiny-lm from the offline cache."""
    write_jsonl(tmp_path / "train.jsonl", colour_rows(24))
    common = [f"data.train={tmp_path / 'train.jsonl'}", "data.max_length=32", "lora.r=4", "train.batch_size=8",
              "train.generate_eval=false", "train.eval_before=false", "precision=fp32"]  # fmt: skip
    sets = [a for s in [f"model={REPO}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2", *common]
            for a in ("--set", s)]  # fmt: skip
    assert main(["train", *sets]) == 0
    adapter = str(tmp_path / "run")
    assert base_model_of(adapter) == f"{REPO}@{cached['commit']}"
    capsys.readouterr()

    assert main(["generate", "--adapter", adapter, "--prompt", "the colour", "--max-new-tokens", "2"]) == 0
    assert f"base model {REPO}@{cached['commit']} (recorded by the adapter" in capsys.readouterr().err
    assert main(["eval", "--adapter", adapter, "--data", str(tmp_path / "train.jsonl"), "--no-generate",
                 "--max-rows", "4", "--json", "--precision", "fp32"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] > 0
    assert main(["merge", "--model", REPO, "--adapter", adapter, "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert main(["export", "--adapter", adapter, "--format", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    assert json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO
    assert main(["combine", adapter, adapter, "--out", str(tmp_path / "both")]) == 0
    assert main(["inspect", adapter, "--model", f"{REPO}@v2", "--png", str(tmp_path / "i.png")]) == 0

    from lorakit.cli import serve as serve_cli

    apps = []
    monkeypatch.setattr(serve_cli, "serve_forever", lambda app, engine, **kw: apps.append(app))
    assert main(["serve", "--model", REPO, "--adapter", f"a={adapter}", "--precision", "fp32"]) == 0
    assert apps[0].state.lorakit.engine.model.name_or_path == REPO
    capsys.readouterr()
    assert main(["bench", "--model", REPO, "--skip-check", "--device", "cpu", "--modes", "base", "--rounds", "1",
                 "--steps", "1", "--batch", "2", "--seq", "16"]) == 0  # fmt: skip
    compare = [a for s in [f"model={REPO}", f"output_dir={tmp_path / 'cmp'}", "train.max_steps=1", *common]
               for a in ("--set", s)]  # fmt: skip
    assert main(["compare", "--no-progress", "--methods", "lora", *compare]) == 0

    from lorakit.ui.forms import check_paths
    from lorakit.ui.runs import Workspace

    (tmp_path / "runs").mkdir()
    ws = Workspace(tmp_path / "runs", tmp_path)
    config = lorakit.train.config.load_config(None, [f"model={REPO}", f"data.train={tmp_path / 'train.jsonl'}"])
    assert "model" not in check_paths(config, ws, "default")


def test_export_takes_its_gguf_base_from_a_hub_repo(offline_hub):  # noqa: F811
    from lorakit.export import orchestrate as export

    commit = add_repo(offline_hub, "acme/base-GGUF", {"base-f16.gguf": b"GGUF"})
    path = export._gguf_base(REPO, "acme/base-GGUF:base-f16.gguf", "gguf-lora")
    assert path == offline_hub / "models--acme--base-GGUF" / "snapshots" / commit / "base-f16.gguf"
    assert export._gguf_base("acme/base-GGUF:base-f16.gguf", None, "gguf") == path  # --model names the GGUF
    with pytest.raises(ValueError, match="--base-gguf acme/base-GGUF names no GGUF file"):
        export._gguf_base(REPO, "acme/base-GGUF", "gguf-lora")
    with pytest.raises(ValueError, match="--model acme/tiny-lm is a Hugging Face model: pass --base-gguf FILE"):
        export._gguf_base(REPO, None, "gguf")
