"""The per-model registry: which adapters a model carries, which are active, and what lorakit changed.

Kept on the model object itself (no global state), keyed by names, so ``copy.deepcopy(model)`` copies it
along with the model and it stays right for the copy: the parameters' original ``requires_grad`` flags are
stored by parameter name (as ``named_parameters`` gives them before any wrapper), not by object identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from .config import LoraConfig
from .layers import LoraLayer, ModulesToSave

_KEY = "_lorakit_registry"


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
    original_requires_grad: dict[str, bool] = field(default_factory=dict)  # by parameter name, unwrapped


def registry(model: nn.Module, create: bool = False) -> Registry:
    reg = model.__dict__.get(_KEY)
    if reg is None:
        if not create:
            raise ValueError("this model has no lorakit adapters; add one with lorakit.inject or load_adapter")
        flags = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
        reg = Registry(original_requires_grad=flags)
        model.__dict__[_KEY] = reg
    return reg


def forget_registry(model: nn.Module) -> None:
    """Drop the registry and give every parameter back the requires_grad flag it had before lorakit (call once
    every wrapper is gone, when parameter names are the original ones again)."""
    reg = registry(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(reg.original_requires_grad.get(name, True))
    del model.__dict__[_KEY]


def has_adapters(model: nn.Module) -> bool:
    reg = model.__dict__.get(_KEY)
    return reg is not None and bool(reg.adapters)


def check_adapter_name(model: nn.Module, name: str) -> None:
    """An existing adapter name, or a ValueError that lists the ones there are."""
    reg = model.__dict__.get(_KEY)
    known = list(reg.adapters) if reg else []
    if name not in known:
        raise ValueError(f"no adapter named {name!r} on this model; adapters present: {known or 'none'}")


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSave]]:
    """Every lorakit wrapper in the model with its path."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer | ModulesToSave):
            yield path, module


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)
