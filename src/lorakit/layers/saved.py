"""``modules_to_save``: a frozen original module plus one trainable copy of it per adapter (PEFT's wrapper)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import BaseWrapper
from .routing import Routing


class ModulesToSave(BaseWrapper):
    """A frozen original module plus one trainable copy per adapter (PEFT's ``modules_to_save``)."""

    wrapped_attr = "original_module"

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.routing: Routing | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters())

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict(keep_vars=True))

    def forward(self, x, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.routing is not None:
            return self._routed(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.modules_to_save]
        if len(names) > 1:
            raise RuntimeError(f"adapters {names} each carry their own copy of this module; activate only one of them")
        module = self.modules_to_save[names[0]] if names else self.original_module
        return module(x, *args, **kwargs)

    def _routed(self, x, *args, **kwargs):
        routing = self.routing
        result = self.original_module(x, *args, **kwargs)
        if not isinstance(result, torch.Tensor):
            raise TypeError("route() supports modules_to_save modules that return a single tensor")
        index = routing.rows_for(result.shape[0], result.device)
        for k, name in enumerate(routing.names, start=1):
            if name in self.modules_to_save and bool((index == k).any()):
                rows = (index == k).view(-1, *([1] * (result.dim() - 1)))
                result = torch.where(rows, self.modules_to_save[name](x, *args, **kwargs), result)
        return result
