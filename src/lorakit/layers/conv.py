"""LoRA for ``nn.Conv2d``: A is a convolution with the base kernel into r channels, B a 1x1 convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer, init_factors
from .routing import Routing


class LoraConv2d(LoraLayer):
    """LoRA for ``nn.Conv2d``: A is a conv with the base kernel into r channels, B a 1x1 conv to d_out."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        assert self.unsupported_reason(base_layer) is None
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @staticmethod
    def unsupported_reason(base_layer: nn.Conv2d) -> str | None:
        if base_layer.groups != 1 or base_layer.dilation != (1, 1):
            return (
                f"LoRA supports Conv2d with groups=1 and dilation=1, got groups={base_layer.groups}, "
                f"dilation={base_layer.dilation}; leave it out with exclude_modules"
            )
        return None

    @property
    def in_out(self) -> tuple[int, int]:
        return self.base_layer.in_channels, self.base_layer.out_channels

    def _tables(self):
        return [self.lora_A, self.lora_B]

    def _create(self, name: str, r: int) -> None:
        base = self.base_layer
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, (1, 1), (1, 1), bias=False)

    def _initialise(self, name: str, init: str) -> None:
        init_factors(self.lora_A[name].weight, self.lora_B[name].weight, init, self.r[name])

    def _own_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight.float()  # (r, in, kh, kw)
        b = self.lora_B[name].weight.float()  # (out, r, 1, 1)
        if a.shape[2:] == (1, 1):
            delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], a.shape[1], 1, 1)
        else:
            delta = F.conv2d(a.transpose(0, 1), b).transpose(0, 1)
        return delta * self.scaling[name]

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name]
        x = self.adapter_input(x, a.weight.dtype)
        return self.lora_B[name](a(self.lora_dropout[name](x))) * self.scaling[name]

    def _routed_update(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        index = self._row_index(x, routing)
        present, layout = self._present(routing)
        if not present:
            return torch.zeros_like(self.base_layer(x))
        base = self.base_layer
        a_cat = torch.cat([self.lora_A[n].weight for n in present])
        b_cat = torch.cat([self.lora_B[n].weight * self.scaling[n] for n in present], dim=1)
        xs = self._row_dropout(self.adapter_input(x, a_cat.dtype), routing.names, index)
        hidden = F.conv2d(xs, a_cat, None, base.stride, base.padding)
        mask = routing.mask(layout, 1, index, hidden.dtype)
        if mask is not None:  # None: every row on the one adapter present
            hidden = hidden * mask[:, :, None, None]
        return F.conv2d(hidden, b_cat)
