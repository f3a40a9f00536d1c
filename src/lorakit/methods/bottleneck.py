"""Bottleneck adapter layers (Houlsby et al., 2019): a small residual MLP after each attention and MLP sublayer.

h -> h + up(act(down(h)))      down: d -> m,  up: m -> d (initialised to zero: training starts at the base)
"""

from __future__ import annotations

import torch
from torch import nn

from .base import TrainableStateMethod, hidden_size

# Sublayer names per family: attention and MLP blocks whose output the adapter follows.
SUBLAYERS = ("self_attn", "attn", "attention", "mlp")


class Bottleneck(nn.Module):
    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.act = nn.GELU()
        self.up = nn.Linear(size, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdaptedSublayer(nn.Module):
    """Runs the original sublayer, then the adapter on its (first) output."""

    def __init__(self, sublayer: nn.Module, dim: int, size: int) -> None:
        super().__init__()
        self.sublayer = sublayer
        self.adapter = Bottleneck(dim, size).to(next(sublayer.parameters()).dtype)

    def forward(self, *args, **kwargs):
        out = self.sublayer(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


class BottleneckAdapters(TrainableStateMethod):
    name = "adapter"
    state_file = "adapters.safetensors"

    def __init__(self, size: int = 64) -> None:
        if size < 1:
            raise ValueError(f"bottleneck size {size} is invalid: use >= 1")
        self.size = size

    def prepare(self, model: nn.Module) -> nn.Module:
        dim = hidden_size(model)
        blocks = _blocks(model)
        model.requires_grad_(False)
        for block in blocks:
            for name in SUBLAYERS:
                sub = getattr(block, name, None)
                if isinstance(sub, nn.Module) and not isinstance(sub, AdaptedSublayer):
                    setattr(block, name, AdaptedSublayer(sub, dim, self.size))
        for module in model.modules():
            if isinstance(module, Bottleneck):
                module.requires_grad_(True)
        return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the children of the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks to add adapters to")
    blocks = list(max(lists, key=len))
    if not any(isinstance(getattr(b, n, None), nn.Module) for b in blocks for n in SUBLAYERS):
        raise ValueError(f"no attention / MLP sublayers named {SUBLAYERS} in the blocks of {type(model).__name__}")
    return blocks


def bottleneck_parameters(dim: int, size: int, blocks: int, sublayers_per_block: int = 2) -> int:
    """Trainable parameters: per adapter, down (d*m + m) and up (m*d + d)."""
    return blocks * sublayers_per_block * (2 * dim * size + size + dim)
