"""Working with the adapters on a model: activate, disable, route per row, delete, merge, unload, count."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attention import restore_attention
from .inject import activate, update_trainable
from .layers import LoraLayer, ModulesToSave, Routing, link_shared_inputs
from .patches import remove_patches
from .state import adapter_modules, check_adapter_name, forget_registry, registry, set_submodule


def _names(model: nn.Module, names: str | Sequence[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("give at least one adapter name")
    for name in names:
        check_adapter_name(model, name)
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat in {names}")
    return names


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters (their updates add up); only they train.

    Raises:
        ValueError: a name is not an adapter of this model.
    """
    activate(model, _names(model, names))


def active_adapters(model: nn.Module) -> list[str]:
    return list(registry(model).active)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside this block: every adapter is off (merged ones are unmerged, then restored)."""
    modules = [m for _, m in adapter_modules(model)]
    merged = _merged_names(model)
    if merged:
        unmerge(model)
    for module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for module in modules:
            module.disabled = False
        if merged:
            merge(model, merged)


@contextlib.contextmanager
def switched_off(model: nn.Module, names: str | Sequence[str]) -> Iterator[nn.Module]:
    """Run inside this block with adapters ``names`` off and the other active adapters on: the model as it was
    before ``names`` were added (a frozen SFT adapter without the adapter training on top of it, say). Nothing
    else changes: which parameters train stays as it was.

    Raises:
        ValueError: an unknown name, or a merged one (unmerge first).
    """
    names = _names(model, names)
    if set(names) & set(_merged_names(model)):
        raise ValueError(f"switched_off() needs unmerged adapters; {names} include merged ones: unmerge first")
    modules = [m for _, m in adapter_modules(model)]
    saved = [m.active_adapters for m in modules]
    for module in modules:
        module.active_adapters = [n for n in module.active_adapters if n not in names]
    try:
        yield model
    finally:
        for module, active in zip(modules, saved, strict=True):
            module.active_adapters = active


_MODULES = "adapter layers"  # route()'s key in a caller's ``stacks``: the model's adapter layers, found once


@contextlib.contextmanager
def route(model: nn.Module, per_row_names: Sequence[str | None], *, stacks: dict | None = None) -> Iterator[nn.Module]:
    """Mixed batch: row i of the next forwards uses adapter ``per_row_names[i]`` (``None``: the base model).

    One forward serves every adapter: linear layers gather each row's A and B and run batched matmuls.
    ``stacks`` (inference only): a dict kept by the caller across forwards in which each linear layer keeps
    its concatenated A and B of the adapters in the batch, so the next forwards with the same adapters skip
    rebuilding them and no per-row copies are made; it also keeps the list of the model's adapter layers, so a
    forward does not walk the model twice to find them. Clear it whenever adapters change: an adapter's weights,
    one loaded, deleted, merged or unmerged.

    Raises:
        ValueError: an unknown adapter name, an empty list, or merged adapters (unmerge first).
    """
    rows = list(per_row_names)
    if not rows:
        raise ValueError("route() needs one adapter name (or None) per batch row; got an empty list")
    names = sorted({n for n in rows if n is not None})
    for name in {n for n in rows if n is not None}:
        check_adapter_name(model, name)
    modules = stacks.get(_MODULES) if stacks is not None else None
    if modules is None:
        if _merged_names(model):
            raise ValueError("route() needs unmerged adapters; call lorakit.unmerge(model) first")
        modules = [m for _, m in adapter_modules(model)]
        if stacks is not None:
            stacks[_MODULES] = modules
    index = torch.tensor([0 if n is None else names.index(n) + 1 for n in rows], dtype=torch.long)
    routing = Routing(names, index, stacks)
    for module in modules:
        module.routing = routing
    check = model.register_forward_pre_hook(_batch_check(len(rows)), with_kwargs=True)
    try:
        yield model
    finally:
        check.remove()
        for module in modules:
            module.routing = None


def _batch_check(rows: int):
    """A forward pre-hook: the model's input must have one row per routed name. Layers inside may then see
    the rows reshaped (flattened with their tokens, say) and still find each row's adapter."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if first is None:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0]
            first = tensors[0] if tensors else None
        if first is not None and first.dim() > 0 and first.shape[0] != rows:
            raise ValueError(
                f"route() was given {rows} row names but the batch has {first.shape[0]} rows; "
                "pass one adapter name (or None) per row"
            )

    return hook


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (unmerging it first if merged); layers left without adapters are unwrapped."""
    check_adapter_name(model, name)
    reg = registry(model)
    for path, module in list(adapter_modules(model)):
        if name not in module.adapter_names:
            continue
        if isinstance(module, LoraLayer):
            module.unmerge([name])
        module.remove_adapter(name)
        if not module.adapter_names:
            set_submodule(model, path, module.base_layer if isinstance(module, LoraLayer) else module.original_module)
    link_shared_inputs(model)
    del reg.adapters[name]
    reg.active = [n for n in reg.active if n != name]
    if reg.adapters:
        update_trainable(model)
    else:
        _forget(model)


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Add adapters' updates into the base weights (default: the active adapters). Exact to float rounding.

    Raises:
        ValueError: unknown name; an adapted weight is tied to another module (merging would change both).
    """
    names = active_adapters(model) if names is None else _names(model, names)
    _refuse_tied(model, names)
    for _, module in adapter_modules(model):
        if isinstance(module, LoraLayer):
            module.merge(names)


_merge_active = merge  # unload's `merge` argument shadows the function inside it


def unmerge(model: nn.Module) -> None:
    """Subtract every merged update from the base weights again."""
    registry(model)
    for _, module in adapter_modules(model):
        if isinstance(module, LoraLayer):
            module.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove all lorakit wrappers and forward patches and return the plain model.

    Args:
        merge: if true, the active adapters are merged first (and their modules_to_save copies kept, in the
            original module's dtype); if false, the original model comes back unchanged.
    """
    reg = registry(model)
    if merge:
        _merge_active(model)
    else:
        unmerge(model)
    for path, module in list(adapter_modules(model)):
        if isinstance(module, LoraLayer):
            if not merge:  # PiSSA adapters give back what they took out of the base weight
                for name in list(module.adapter_names):
                    module.forget_variants(name)
            set_submodule(model, path, module.base_layer)
            continue
        chosen = [n for n in reg.active if n in module.adapter_names] if merge else []
        set_submodule(model, path, module.unloaded_copy(chosen[0]) if chosen else module.original_module)
    _forget(model)
    return model


def _forget(model: nn.Module) -> None:
    """Drop the registry, give every original parameter back its requires_grad flag, and take away every
    forward lorakit patched (fused forwards, the serving fast path) and lorakit's attention."""
    forget_registry(model)
    remove_patches(model)
    restore_attention(model)


def _merged_names(model: nn.Module) -> list[str]:
    merged: list[str] = []
    for _, module in adapter_modules(model):
        if isinstance(module, LoraLayer):
            merged.extend(n for n in module.merged_adapters if n not in merged)
    return merged


def _refuse_tied(model: nn.Module, names: list[str]) -> None:
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for path, module in adapter_modules(model):
        uses = isinstance(module, LoraLayer) and any(n in module.adapter_names for n in names)
        if uses and counts[id(module.base_layer.weight)] > 1:
            raise ValueError(
                f"cannot merge into {path}: its weight is shared (tied) with another module, which the "
                "merge would change too. Untie it first (for example set tie_word_embeddings=False and "
                "clone the output head's weight), or keep the adapter unmerged."
            )


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts of a model: what trains and what does not."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable and total parameters (shared tensors counted once)."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return TrainableSummary(trainable=trainable, total=total)


def modules_with_adapter(model: nn.Module, name: str) -> list[tuple[str, LoraLayer | ModulesToSave]]:
    return [(p, m) for p, m in adapter_modules(model) if name in m.adapter_names]
