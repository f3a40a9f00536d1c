"""Visible, reversible forward patches: how lorakit changes a module's forward without changing its class.

The fused training forwards (``lorakit.fuse_forwards``) and the serving engine's few-row CPU path
(``enable_skinny_linear``) replace
the ``forward`` of individual module instances. Each patch here also sets the instance's ``extra_repr``,
so ``print(model)`` names it on the module it changed (``lorakit: fused gated MLP``), and records itself,
so ``lorakit.unload`` (``remove_patches``) gives every module its own forward back. Nothing else in lorakit
assigns a module's forward.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn

from .fastpath import skinny_linear_forward

FEW_ROWS = "few-row CPU fast path"
_KEY = "_lorakit_patch"  # the patch's label, in the module instance's __dict__


def patch_forward(module: nn.Module, forward: Callable, label: str) -> bool:
    """Give ``module`` the forward ``forward(module, *args)``, shown as ``lorakit: {label}`` in its repr.

    Returns False (and changes nothing) when the module's forward is already replaced on the instance, by
    lorakit or by anyone else.
    """
    if "forward" in module.__dict__:
        return False
    own_repr = type(module).extra_repr
    module.forward = types.MethodType(forward, module)
    module.extra_repr = types.MethodType(lambda self: _with_label(own_repr(self), label), module)
    module.__dict__[_KEY] = label
    return True


def enable_skinny_linear(model: nn.Module) -> int:
    """Give the model's ``nn.Linear`` layers the few-rows CPU layout for decoding (``lorakit.fastpath``);
    returns how many layers changed."""
    return sum(patch_forward(m, skinny_linear_forward, FEW_ROWS) for m in model.modules() if type(m) is nn.Linear)


def _with_label(text: str, label: str) -> str:
    return f"{text}, lorakit: {label}" if text else f"lorakit: {label}"


def patch_label(module: nn.Module) -> str | None:
    """The label of the lorakit patch on ``module``, or None."""
    return module.__dict__.get(_KEY)


def patched(model: nn.Module, label: str | None = None) -> list[str]:
    """Paths of the modules lorakit patched (only those with ``label`` when given)."""
    return [p for p, m in model.named_modules() if patch_label(m) is not None and label in (None, patch_label(m))]


def remove_patches(model: nn.Module, label: str | None = None) -> int:
    """Give patched modules (only those with ``label`` when given) their own forward back; returns how many."""
    count = 0
    for module in model.modules():
        if patch_label(module) is not None and label in (None, patch_label(module)):
            for key in ("forward", "extra_repr", _KEY):
                module.__dict__.pop(key, None)
            count += 1
    return count
