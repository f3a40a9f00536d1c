"""Adding adapters to a model: target matching (PEFT's rules), the layer dispatch table, freezing."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from . import fusions
from ._bnb import keep_plain_layout
from .config import ALL_LINEAR, LoraConfig
from .layers import LoraLayer, ModulesToSave, is_linear_like, link_shared_inputs, wrapper_classes

_HEAD_NAMES = ("classifier", "score")  # classification heads that "all-linear" leaves alone
_DEFAULT_LAYER_INDEX = re.compile(r".*\.[^.]*\.(\d+)\.")


@dataclass
class AdapterInfo:
    """What the model remembers about one adapter."""

    config: LoraConfig
    targets: list[str]  # module paths that carry this adapter
    saved_modules: list[str]  # module paths with a modules_to_save copy
    trainable: bool = True


@dataclass
class Registry:
    """Per-model adapter state, kept on the model object (no global state)."""

    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    original_requires_grad: dict[int, bool] = field(default_factory=dict)


def registry(model: nn.Module, create: bool = False) -> Registry:
    reg = model.__dict__.get("_lorakit_registry")
    if reg is None:
        if not create:
            raise ValueError("this model has no lorakit adapters; add one with lorakit.inject or load_adapter")
        reg = Registry(original_requires_grad={id(p): p.requires_grad for p in model.parameters()})
        model.__dict__["_lorakit_registry"] = reg
    return reg


def has_adapters(model: nn.Module) -> bool:
    reg = model.__dict__.get("_lorakit_registry")
    return reg is not None and bool(reg.adapters)


def check_adapter_name(model: nn.Module, name: str) -> None:
    """An existing adapter name, or a ValueError that lists the ones there are."""
    reg = model.__dict__.get("_lorakit_registry")
    known = list(reg.adapters) if reg else []
    if name not in known:
        raise ValueError(f"no adapter named {name!r} on this model; adapters present: {known or 'none'}")


def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add LoRA adapter ``name`` to ``model`` in place and make it the active, trainable adapter.

    Args:
        model: any ``torch.nn.Module``; its class does not change, so ``generate()`` and friends still work.
        config: the adapter's ``LoraConfig``.
        name: adapter name, unique on this model.

    Returns:
        The same model object. Everything but the active adapter's parameters (and the biases or
        modules that ``config.bias`` / ``config.modules_to_save`` name) is frozen.

    Raises:
        TypeError: ``config`` is not a LoraConfig.
        ValueError: the name is in use or invalid; a target entry matches nothing (the message suggests
            close module names); a matched module has an unsupported type.
    """
    from .adapters import set_active  # late import: adapters builds on this module

    check_new_name(model, name)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    saved = find_modules_to_save(model, config.modules_to_save or [], strict=True)
    targets = find_targets(model, config, skip=saved, strict=True)
    _warn_large_ranks(model, config, targets)
    add_adapter_layers(model, config, name, targets, saved)
    set_active(model, [name])
    return model


def add_adapter_layers(model: nn.Module, config: LoraConfig, name: str, targets: list[str], saved: list[str]) -> None:
    """Wrap (or reuse wrappers of) ``targets`` and ``saved`` and add the adapter's tensors; records it."""
    reg = registry(model, create=True)
    _check_variants(model, config, targets)
    for module in model.modules():  # gradients must pass every 4-bit layer, wrapped or not (lorakit._bnb)
        keep_plain_layout(module)
    for path in targets:
        layer = _wrap(model, path, _lora_wrapper)
        r, alpha = config.rank_and_alpha(path)
        layer.add_adapter(name, r, alpha, config.scaling(r, alpha), config.dropout, config.init, config.use_dora)
    for path in saved:
        _wrap(model, path, ModulesToSave).add_adapter(name)
    reg.adapters[name] = AdapterInfo(config=config, targets=targets, saved_modules=saved)
    link_shared_inputs(model)
    fusions.fuse(model)


def _check_variants(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    """DoRA and PiSSA need linear layers: refuse before anything is wrapped."""
    if not (config.use_dora or config.init == "pissa"):
        return
    other = [p for p in targets if not is_linear_like(model.get_submodule(p))]
    if other:
        what = "use_dora" if config.use_dora else "init='pissa'"
        kinds = sorted({type(model.get_submodule(p)).__name__ for p in other})
        raise ValueError(
            f"{what} applies to linear layers only, but the targets include {_sample(other)} ({', '.join(kinds)}); "
            "narrow target_modules to linear layers"
        )


def check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name {name!r} is invalid: use a non-empty name without dots")
    reg = model.__dict__.get("_lorakit_registry")
    if reg is not None and name in reg.adapters:
        raise ValueError(
            f"adapter name {name!r} is already in use on this model; pick another name or remove it first "
            f"with lorakit.delete_adapter(model, {name!r})"
        )


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) pairs a pattern may target: everything except the insides of lorakit wrappers."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoraLayer | ModulesToSave):
            inside.append(path)
        yield path, module


def name_matches(entry: str, path: str) -> bool:
    """A list entry matches a module path exactly or as a dotted suffix (PEFT's rule)."""
    return path == entry or path.endswith("." + entry)


def _pattern_matches(pattern: list[str] | str, path: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(name_matches(entry, path) for entry in pattern)


def find_targets(model: nn.Module, config: LoraConfig, skip: list[str] = (), strict: bool = True) -> list[str]:
    """Module paths that ``config`` targets, in model order; errors name what does not match."""
    modules = [(p, m) for p, m in candidate_modules(model) if not _inside_any(p, skip)]
    if config.target_modules == ALL_LINEAR:
        heads = _output_heads(model)
        matched = [p for p, m in modules if is_linear_like(m) and p not in heads]
        if not matched:
            raise ValueError("target_modules='all-linear' found no nn.Linear or Conv1D layer in this model")
    else:
        matched = [p for p, _ in modules if _pattern_matches(config.target_modules, p)]
        if strict:
            _check_every_entry_matches(config.target_modules, [p for p, _ in modules])
    if config.exclude_modules is not None:
        matched = [p for p in matched if not _pattern_matches(config.exclude_modules, p)]
    if config.layers_to_transform is not None:
        matched = [p for p in matched if _layer_index(p, config.layers_pattern) in config.layers_to_transform]
    if not matched:
        raise ValueError(
            f"target_modules={config.target_modules!r} selects no module once exclude_modules / "
            f"layers_to_transform are applied (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r})"
        )
    by_path = dict(modules)
    _check_supported([(p, by_path[p]) for p in matched])
    return matched


def find_modules_to_save(model: nn.Module, entries: list[str], strict: bool = True) -> list[str]:
    """Module paths named by ``modules_to_save`` entries (exact paths or suffixes)."""
    if not entries:
        return []
    paths = [p for p, _ in candidate_modules(model)]
    if strict:
        _check_every_entry_matches(entries, paths, what="modules_to_save")
    found = [p for p in paths if any(name_matches(e, p) for e in entries)]
    return [p for p in found if not _inside_any(p, [q for q in found if q != p])]


def _inside_any(path: str, parents: list[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in parents)


def _output_heads(model: nn.Module) -> set[str]:
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for path, module in model.named_modules():
        if out is not None and (module is out or getattr(module, "base_layer", None) is out):
            heads.add(path)
    if not heads:
        heads.update(name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module))
    return heads


def _layer_index(path: str, layers_pattern: list[str] | None) -> int | None:
    if not layers_pattern:
        found = _DEFAULT_LAYER_INDEX.match(path)
        return int(found.group(1)) if found else None
    for pattern in layers_pattern:
        found = re.match(rf".*\.{pattern}\.(\d+)\.", path)
        if found:
            return int(found.group(1))
    return None


def _check_every_entry_matches(pattern: list[str] | str, paths: list[str], what: str = "target_modules") -> None:
    if isinstance(pattern, str):
        if not any(re.fullmatch(pattern, p) for p in paths):
            raise ValueError(
                f"{what} regex {pattern!r} matches no module path (it must match the whole path). "
                f"Some paths in this model: {_sample(paths)}"
            )
        return
    missing = [entry for entry in pattern if not any(name_matches(entry, p) for p in paths)]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths} | set(paths))
        hints = []
        for entry in missing:
            close = difflib.get_close_matches(entry, names, n=3, cutoff=0.5)
            hints.append(f"{entry!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        leaf_names = sorted({p.rsplit(".", 1)[-1] for p in paths if not p.rsplit(".", 1)[-1].isdigit()})
        raise ValueError(
            f"{what} entr{'y' if len(missing) == 1 else 'ies'} {', '.join(hints)} matched no module. "
            f"Module names in this model: {_sample(leaf_names, 40)}"
        )


def _sample(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def supported_types() -> list[str]:
    return [base.__name__ for base, _ in wrapper_classes()]


def _wrapper_class(module: nn.Module) -> type[LoraLayer]:
    for base_type, wrapper in wrapper_classes():
        if isinstance(module, base_type):
            return wrapper
    raise AssertionError("checked by _check_supported")


def _lora_wrapper(module: nn.Module) -> LoraLayer:
    return _wrapper_class(module)(module)


def _check_supported(pairs: list[tuple[str, nn.Module]]) -> None:
    bad = [
        (p, type(m).__name__)
        for p, m in pairs
        if not isinstance(m, LoraLayer) and not any(isinstance(m, t) for t, _ in wrapper_classes())
    ]
    if bad:
        listed = ", ".join(f"{p} ({t})" for p, t in bad[:5])
        raise ValueError(
            f"cannot add LoRA to {listed}{' ...' if len(bad) > 5 else ''}: unsupported layer type. "
            f"Supported types: {', '.join(supported_types())}. Target the linear layers inside instead "
            "(for example 'q_proj' rather than 'self_attn')."
        )
    for path, module in pairs:
        if not isinstance(module, LoraLayer):
            reason = _wrapper_class(module).unsupported_reason(module)
            if reason:
                raise ValueError(f"cannot add LoRA to {path}: {reason}")


def _warn_large_ranks(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    too_big = []
    for path in targets:
        module = model.get_submodule(path)
        if isinstance(module, LoraLayer):
            module = module.base_layer
        dims = _dims(module)
        r, _ = config.rank_and_alpha(path)
        if dims and r > min(dims):
            too_big.append(f"{path} (r={r}, dims={dims[0]}x{dims[1]})")
    if too_big:
        warnings.warn(
            f"rank exceeds min(d_in, d_out) for {len(too_big)} layer(s): {', '.join(too_big[:3])}"
            f"{' ...' if len(too_big) > 3 else ''}. The update cannot use more rank than that, so the extra "
            "parameters are wasted; lower r or rank_pattern for these layers.",
            stacklevel=3,
        )


def _dims(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Conv2d):  # the update's rank is bounded by the unfolded input size
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw, module.out_channels
    if isinstance(getattr(module, "in_features", None), int):  # nn.Linear, also with a packed quantized weight
        return module.out_features, module.in_features
    weight = getattr(module, "weight", None)
    return tuple(weight.shape[:2]) if weight is not None and weight.dim() == 2 else None


def _wrap(model: nn.Module, path: str, factory) -> nn.Module:
    module = model.get_submodule(path)
    if isinstance(module, LoraLayer | ModulesToSave):
        return module
    wrapper = factory(module)
    wrapper.train(module.training)  # an eval-mode model stays in eval mode (no LoRA dropout at inference)
    set_submodule(model, path, wrapper)
    return wrapper


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSave]]:
    """Every lorakit wrapper in the model with its path."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer | ModulesToSave):
            yield path, module


def update_trainable(model: nn.Module) -> None:
    """requires_grad: on for the active, trainable adapters (and their biases / saved modules), off elsewhere."""
    reg = registry(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in reg.active:
        info = reg.adapters[name]
        if not info.trainable:
            continue
        for path in info.targets + info.saved_modules:
            for param in model.get_submodule(path).adapter_parameters(name):
                param.requires_grad_(True)
        for param in bias_parameters(model, info).values():
            param.requires_grad_(True)


def bias_parameters(model: nn.Module, info: AdapterInfo) -> dict[str, nn.Parameter]:
    """The biases an adapter trains (``config.bias``), by their path in the wrapped model."""
    if info.config.bias == "none":
        return {}
    if info.config.bias == "lora_only":
        found = {}
        for path in info.targets:
            bias = getattr(model.get_submodule(path).base_layer, "bias", None)
            if isinstance(bias, nn.Parameter):
                found[f"{path}.base_layer.bias"] = bias
        return found
    skip = [p for p, _ in adapter_modules(model)]
    return {n: p for n, p in model.named_parameters() if n.endswith("bias") and not _is_adapter_copy(n, skip)}


def _is_adapter_copy(param_path: str, wrapper_paths: list[str]) -> bool:
    inner = (".lora_", ".modules_to_save.", ".original_module.")
    return any(param_path.startswith(w + part) for w in wrapper_paths for part in inner)
