"""The dispatch table: which LoRA wrapper takes which layer type, and what ``all-linear`` targets."""

from __future__ import annotations

from torch import nn

from .base import LoraLayer
from .conv import LoraConv2d
from .embedding import LoraEmbedding
from .linear import Conv1D, LoraConv1D, LoraLinear


def wrapper_classes() -> list[tuple[type[nn.Module], type[LoraLayer]]]:
    """The dispatch table, in order: the first base type that matches picks the wrapper."""
    table: list[tuple[type[nn.Module], type[LoraLayer]]] = [
        (nn.Embedding, LoraEmbedding),
        (nn.Conv2d, LoraConv2d),
        (nn.Linear, LoraLinear),
    ]
    if Conv1D is not None:
        table.insert(0, (Conv1D, LoraConv1D))
    return table


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or GPT-2 Conv1D, wrapped or not: what ``all-linear`` targets."""
    if isinstance(module, LoraLayer):
        module = module.base_layer
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))
