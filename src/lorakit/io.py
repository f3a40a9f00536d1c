"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors, atomic, validated."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from . import durable, hub
from .adapters import delete_adapter, set_active
from .config import ALL_LINEAR, LoraConfig
from .inject import add_adapter_layers, bias_parameters, check_new_name
from .layers import AdapterDtype, LoraConv1D, LoraEmbedding, check_adapter_dtype
from .precision import LOW_PRECISION
from .state import check_adapter_name, registry
from .targeting import find_modules_to_save, find_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
PREFIX = "base_model.model."

# PEFT config keys with no effect on a plain LoRA adapter's weights or forward pass: read and ignored.
_IGNORED_KEYS = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "init_lora_weights", "fan_in_fan_out", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "ensure_weight_tying",
    "layer_replication_config", "runtime_config", "kasa_config", "monteclora_config", "velora_config",
    "astra_config",
}  # fmt: skip
# PEFT features lorakit does not implement: fine when unset (null/false/empty), an error otherwise.
_UNSUPPORTED_KEYS = {
    "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
    "alora_invocation_tokens", "lora_bias", "use_bdlora", "arrow_config",
}  # fmt: skip
_UNSET = (None, False, [], {}, "")
_MAPPED_KEYS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "bias", "modules_to_save", "use_dora",
}  # fmt: skip
_INIT_TO_PEFT = {"default": True, "gaussian": "gaussian", "random": False, "pissa": "pissa"}


# ----- tensors ----------------------------------------------------------------------------------------
def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The live tensors of adapter ``name`` under PEFT's file keys (``base_model.model.<path>.lora_A.weight``)."""
    info = registry(model).adapters[name]
    tensors: dict[str, torch.Tensor] = {}
    for path in info.targets + info.saved_modules:
        for key, tensor in model.get_submodule(path).adapter_state(name).items():
            tensors[f"{PREFIX}{path}.{key}"] = tensor
    for key, tensor in bias_parameters(model, info).items():
        tensors[PREFIX + key] = tensor
    return tensors


# ----- config -----------------------------------------------------------------------------------------
def pissa_as_lora_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A PiSSA adapter's tensors as an ordinary LoRA adapter for the original base weight W.

    Training left ``W_res + s B A`` where ``W = W_res + s B_0 A_0``, so the change to W is
    ``s (B A - B_0 A_0) = s [B, -B_0] [A; A_0]``: rank 2r, same scaling (PEFT's conversion).
    """
    tensors = dict(adapter_tensors(model, name))
    for path in registry(model).adapters[name].targets:
        layer = model.get_submodule(path)
        pissa = next((v for v in layer.variants.get(name, []) if v.name == "pissa"), None)
        if pissa is None:
            continue
        a0, b0 = pissa.initial_factors(layer, name)
        key = f"{PREFIX}{path}."
        tensors[key + "lora_A.weight"] = torch.cat([tensors[key + "lora_A.weight"], a0], dim=0)
        tensors[key + "lora_B.weight"] = torch.cat([tensors[key + "lora_B.weight"], -b0], dim=1)
    return tensors


def peft_config_dict(model: nn.Module, name: str, pissa_as_lora: bool = False) -> dict[str, Any]:
    """adapter_config.json contents for adapter ``name``, in PEFT's vocabulary. With ``pissa_as_lora``, a
    PiSSA adapter is described as the rank-2r plain LoRA adapter of ``pissa_as_lora_tensors``."""
    info = registry(model).adapters[name]
    c = info.config
    if pissa_as_lora and c.init == "pissa":  # rank doubles; alpha follows so that the scaling stays the same
        factor = math.sqrt(2) if c.use_rslora else 2.0
        c = dataclasses.replace(
            c,
            r=2 * c.r,
            alpha=factor * c.alpha,
            rank_pattern={k: 2 * v for k, v in c.rank_pattern.items()},
            alpha_pattern={k: factor * v for k, v in c.alpha_pattern.items()},
            init="default",
        )
    targets: list[str] | str = c.target_modules
    if targets == ALL_LINEAR or (isinstance(targets, str) and c.layers_to_transform is not None):
        targets = list(info.targets)  # PEFT, too, writes the resolved module paths for "all-linear"
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": c.r,
        "lora_alpha": _plain_number(c.alpha),
        "lora_dropout": c.dropout,
        "target_modules": targets,
        "exclude_modules": c.exclude_modules,
        "layers_to_transform": c.layers_to_transform,
        "layers_pattern": c.layers_pattern,
        "rank_pattern": dict(c.rank_pattern),
        "alpha_pattern": {k: _plain_number(v) for k, v in c.alpha_pattern.items()},
        "use_rslora": c.use_rslora,
        "use_dora": c.use_dora,
        "bias": c.bias,
        "modules_to_save": c.modules_to_save,
        "fan_in_fan_out": any(isinstance(model.get_submodule(p), LoraConv1D) for p in info.targets),
        "init_lora_weights": _INIT_TO_PEFT[c.init],
        "inference_mode": True,
        # the base's commit when it came from the Hugging Face cache (transformers records it): PEFT's
        # AutoPeftModel and lorakit load that revision of the base again
        "revision": getattr(getattr(model, "config", None), "_commit_hash", None),
    }


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if cls.endswith(suffix):
            return task
    return None


def config_from_peft_dict(data: dict[str, Any], source: str) -> LoraConfig:
    """A LoraConfig from adapter_config.json contents; unknown keys warn, unsupported features raise."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type is {data.get('peft_type')!r}; lorakit loads LoRA adapters only")
    for key in sorted(_UNSUPPORTED_KEYS & data.keys()):
        if data[key] not in _UNSET:
            raise ValueError(f"{source}: {key}={data[key]!r} uses a PEFT feature lorakit does not support")
    # a key newer PEFT releases add for a feature left unset (null, false, empty) changes nothing: read quietly
    unknown = sorted(k for k in data.keys() - _IGNORED_KEYS - _UNSUPPORTED_KEYS - _MAPPED_KEYS if data[k] not in _UNSET)
    if unknown:
        warnings.warn(f"{source}: ignoring config keys lorakit does not know: {', '.join(unknown)}", stacklevel=3)
    init = data.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", "pissa"):
        warnings.warn(
            f"{source}: init_lora_weights={init!r}; if that method changed the base weights (PiSSA, OLoRA, "
            "LoftQ), this adapter only reproduces the trained model on that modified base",
            stacklevel=3,
        )
    if "r" not in data or "target_modules" not in data:
        raise ValueError(f"{source}: missing required key(s) {[k for k in ('r', 'target_modules') if k not in data]}")
    try:
        return LoraConfig(
            r=data["r"],
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0) or 0.0,
            target_modules=data["target_modules"],
            exclude_modules=data.get("exclude_modules"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern") or None,
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            use_rslora=bool(data.get("use_rslora", False)),
            bias=data.get("bias", "none"),
            modules_to_save=data.get("modules_to_save") or None,
            use_dora=bool(data.get("use_dora") or False),
            init="pissa" if init == "pissa" else "default",  # PiSSA re-derives the residual base on load
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None


# ----- save -------------------------------------------------------------------------------------------
def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    pissa_as_lora: bool = True,
    *,
    values: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter ``name`` as PEFT does: ``adapter_config.json`` and ``adapter_model.safetensors``.

    Both files are replaced together (``durable.write_many``): a crash at any moment leaves the previous adapter
    or the new one, whole; other files in ``directory`` are left alone. Tensors are saved in float32 at least: a bfloat16 or
    float16 adapter (``adapter_dtype="base"`` over a bf16 model) is widened to float32 (exactly), as PEFT's
    files usually are, so any loader reads it in any dtype.

    A PiSSA adapter (``init="pissa"``) is written as an ordinary rank-2r LoRA adapter that applies to the
    original base model, like PEFT's ``path_initial_model_for_weight_conversion``; ``pissa_as_lora=False``
    writes the raw PiSSA factors instead (loading those re-derives the residual base weight, as PEFT does).

    Returns:
        The directory written.

    Raises:
        ValueError: unknown adapter name, or ``directory`` is an existing file.
        OSError: the files could not be written (disk full, permissions); files already there are unchanged.
    """
    check_adapter_name(model, name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save adapter to {directory}: it is a file, not a directory; choose another path")
    live = pissa_as_lora_tensors(model, name) if pissa_as_lora else adapter_tensors(model, name)
    if values is not None:
        live = _gathered(model, live, values)
    tensors = {k: _file_tensor(t) for k, t in live.items()}
    config = json.dumps(peft_config_dict(model, name, pissa_as_lora), indent=2, sort_keys=True) + "\n"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        durable.write_many(
            {
                directory / WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"}),
                directory / CONFIG_NAME: config.encode(),
            }
        )
    except OSError as err:
        raise OSError(
            err.errno,
            f"could not save adapter to {directory}: {err.strerror or err}; files already there are unchanged",
        ) from err
    return directory


def _file_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of ``tensor`` for the file, float32 where it was bfloat16 or float16 (exact)."""
    dtype = torch.float32 if tensor.dtype in LOW_PRECISION else tensor.dtype
    return tensor.detach().to("cpu", dtype=dtype, copy=True).contiguous()


def _gathered(model: nn.Module, live: dict[str, torch.Tensor], values: dict[str, torch.Tensor]):
    """The adapter's tensors taken from ``values`` (whole tensors by parameter or buffer name, gathered from a
    sharded model) instead of the model's own (shards)."""
    names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    out = {}
    for key, tensor in live.items():
        name = names.get(id(tensor))
        if name is None or name not in values:
            raise ValueError(f"{key} is not among the gathered tensors; save this adapter from an unsharded model")
        out[key] = values[name]
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save ``tensors`` to ``path`` atomically and durably (``durable.replace_file``).

    safetensors reports I/O failures as SafetensorError; they are raised as OSError with the errno
    (ENOSPC for a full disk) so callers can handle every write failure alike. On failure ``path`` is unchanged.
    """
    with durable.replace_file(path) as tmp:
        try:
            save_file(tensors, str(tmp))
        except SafetensorError as err:
            found = re.search(r"os error (\d+)", str(err))
            if not found:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from err


atomic_write_many = durable.write_many  # the name the exports import


# ----- load -------------------------------------------------------------------------------------------
def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter directory without touching any model (never unpickles anything)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"adapter directory {directory} does not exist (or is not a directory)")
    durable.recover(directory, clean=False, kinds=("commit",))  # a save cut short by a crash: finish it
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
    if not config_path.is_file():
        present = sorted(p.name for p in directory.iterdir())[:10]
        raise ValueError(
            f"{directory} is not an adapter directory: {CONFIG_NAME} is missing (found: {present or 'nothing'})"
        )
    if not weights_path.is_file():
        if pickles:
            raise ValueError(
                f"{directory} holds {pickles[0]}, a pickle file, and no {WEIGHTS_NAME}. lorakit never unpickles "
                "files (loading a pickle can run arbitrary code). Convert it where you trust it, for example "
                "with PEFT: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
            )
        raise ValueError(f"{directory} has no {WEIGHTS_NAME}; the adapter is incomplete")
    config = config_from_peft_dict(_read_json(config_path), str(config_path))
    return config, read_safetensors(weights_path)


def base_model_of(directory: str | os.PathLike) -> str | None:
    """The base model an adapter directory records (``base_model_name_or_path``, with ``@revision`` for a Hub
    id when one is recorded): a model spec ``load_model`` takes; None when the adapter records none."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return None
    data = _read_json(path)
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not isinstance(base, str) or not base:
        return None
    revision = data.get("revision")
    if isinstance(revision, str) and revision and (named := hub.parse(base)) is not None and not named.revision:
        return str(hub.HubModel(named.repo, revision, named.gguf_file))
    return base


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the adapter") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; refuses corrupt files, non-float tensors and NaN/inf values."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except Exception as err:  # safetensors raises its own error types, and OSError for short reads
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it is truncated or "
            "corrupt: save or copy the adapter again"
        ) from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {key} has dtype {tensor.dtype}; adapter weights must be floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {key} contains NaN or infinite values; refusing to load it")
    return tensors


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    trainable: bool = False,
    *,
    adapter_dtype: AdapterDtype = None,
) -> nn.Module:
    """Load a PEFT or lorakit adapter onto ``model`` as adapter ``name`` and make it the active one.

    Every key and shape in the file is checked against the model first; on any mismatch nothing is
    changed and one error lists them all (the first one with both shapes).

    Args:
        trainable: leave the adapter's parameters trainable (to continue training); frozen by default.
        adapter_dtype: the dtype the adapter's tensors get, whatever the file's: as for ``inject``, float32
            over a bfloat16 / float16 base by default (run the forward under ``torch.autocast`` for bf16
            products), ``"base"`` for the base layer's dtype, or a ``torch.dtype``.

    Raises:
        ValueError: missing/corrupt files, a pickle instead of safetensors, unsupported PEFT features,
            name already in use, an invalid ``adapter_dtype``, keys/shapes that do not fit this model, or a
            LoRA target whose weight is tied to the input embedding (as ``inject`` refuses it).
    """
    check_new_name(model, name)
    check_adapter_dtype(adapter_dtype)
    config, tensors = read_adapter(directory)
    try:
        saved = find_modules_to_save(model, config.modules_to_save or [], strict=False)
        targets = find_targets(model, config, skip=saved, strict=False)
    except ValueError as err:
        raise ValueError(f"adapter {directory} does not fit this model: {err}") from None
    _check_ranks(config, tensors, targets, directory)  # before any allocation: r comes from an untrusted file
    add_adapter_layers(model, config, name, targets, saved, adapter_dtype=adapter_dtype)
    expected = adapter_tensors(model, name)
    problems = _compare(expected, tensors, _embedding_base_weights(model, targets))
    if problems:
        delete_adapter(model, name)
        raise ValueError(
            f"adapter {directory} does not fit this model ({len(problems)} problem(s)); nothing was loaded:\n  "
            + "\n  ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
    registry(model).adapters[name].trainable = trainable
    set_active(model, [name])
    return model


def _check_ranks(config: LoraConfig, tensors: dict[str, torch.Tensor], targets: list[str], directory) -> None:
    """Checked before the layers are created, so that a config claiming a huge r is refused instead of
    allocated: each targeted layer whose A and B are in the file must have the rank the config gives it, and
    at least one targeted layer must be in the file (missing ones are listed with the rest afterwards)."""
    problems, found = [], 0
    for path in targets:
        r = config.rank_and_alpha(path)[0]
        a = tensors.get(f"{PREFIX}{path}.lora_A.weight", tensors.get(f"{PREFIX}{path}.lora_embedding_A"))
        b = tensors.get(f"{PREFIX}{path}.lora_B.weight", tensors.get(f"{PREFIX}{path}.lora_embedding_B"))
        if a is None or b is None:
            continue
        found += 1
        if a.dim() < 2 or b.dim() < 2 or a.shape[0] != r or b.shape[1] != r:
            problems.append(
                f"{PREFIX}{path}: the config gives rank {r}, the file's A is {tuple(a.shape)}, B {tuple(b.shape)}"
            )
    if targets and not found:
        problems.append(f"none of the {len(targets)} targeted layers has a lora_A / lora_B in the file")
    if problems:
        raise ValueError(
            f"adapter {directory} does not fit this model ({len(problems)} problem(s)); nothing was loaded:\n  "
            + "\n  ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )


def _embedding_base_weights(model: nn.Module, targets: list[str]) -> dict[str, torch.Size]:
    """PEFT also saves a targeted embedding's base weight; accepted when its shape fits, then ignored."""
    return {
        f"{PREFIX}{p}.base_layer.weight": model.get_submodule(p).base_layer.weight.shape
        for p in targets
        if isinstance(model.get_submodule(p), LoraEmbedding)
    }


def _compare(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], optional: dict[str, torch.Size]
) -> list[str]:
    problems = []
    for key, target in expected.items():
        if key not in found:
            problems.append(f"missing key {key} (model expects shape {tuple(target.shape)})")
        elif found[key].shape != target.shape:
            problems.append(
                f"shape mismatch at {key}: file has {tuple(found[key].shape)}, model expects {tuple(target.shape)}"
            )
    for key in found.keys() - expected.keys():
        if key in optional:
            if found[key].shape != optional[key]:
                problems.append(
                    f"shape mismatch at {key}: file has {tuple(found[key].shape)}, model has {tuple(optional[key])}"
                )
        else:
            problems.append(f"unexpected key {key} (no such adapter tensor in this model)")
    shape_first = sorted(problems, key=lambda p: not p.startswith("shape"))
    return shape_first
