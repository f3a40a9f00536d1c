"""``modules_to_save``: a frozen original module plus one trainable copy of it per adapter (PEFT's wrapper).

A copy is in the adapter dtype (``lorakit.layers.base.adapter_dtype_for``): by default float32 when the original
is bfloat16 or float16, so that it trains in float32 as the LoRA factors do. Such a copy takes its input in its
own dtype and gives its output back in the input's (in the original's dtype for integer input, the token ids
of an embedding): the model around it sees the dtypes the original gave, with or without ``torch.autocast``
(a float32 ``lm_head`` fed bf16 hidden states would otherwise refuse them outside autocast). Like the LoRA
update's reference maths: computed in the adapter's dtype, cast back.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .._bnb import is_quantized
from ..precision import cast
from .base import AdapterDtype, BaseWrapper, adapter_dtype_for
from .routing import Routing


class ModulesToSave(BaseWrapper):
    """A frozen original module plus one trainable copy per adapter (PEFT's ``modules_to_save``), each in the
    adapter dtype (see the module docstring)."""

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

    def add_adapter(self, name: str, *, adapter_dtype: AdapterDtype = None) -> None:
        """A trainable copy of the original for adapter ``name``, in the dtype ``adapter_dtype_for`` gives (a
        module holding quantized layers is copied as it is)."""
        module = copy.deepcopy(self.original_module)
        original = float_dtype_of(module)
        if original is not None and not any(is_quantized(m) for m in module.modules()):
            dtype = adapter_dtype_for(original, adapter_dtype)
            if dtype != original:
                module.to(dtype)
        self.modules_to_save[name] = module

    def unloaded_copy(self, name: str) -> nn.Module:
        """Adapter ``name``'s copy in the original's dtype, for ``unload`` to put in the original's place: one
        trained in float32 over a bf16 model is rounded to bf16 (as a merged LoRA update is), so the plain model
        keeps one dtype and runs without autocast."""
        module = self.modules_to_save[name]
        original = float_dtype_of(self.original_module)
        if original is not None and float_dtype_of(module) != original:
            module.to(original)
        return module

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
        if not names:
            return self.original_module(x, *args, **kwargs)
        return self._run_copy(self.modules_to_save[names[0]], x, *args, **kwargs)

    def _run_copy(self, module: nn.Module, x, *args, **kwargs):
        """``module(x, ...)`` for a copy; one in another dtype than the original's takes ``x`` in its dtype and
        gives a tensor output back in ``x``'s (the original's for integer ``x``)."""
        dtype, original = float_dtype_of(module), float_dtype_of(self.original_module)
        if dtype == original or not isinstance(x, torch.Tensor):
            return module(x, *args, **kwargs)
        out = module(cast(x, dtype), *args, **kwargs)
        back = x.dtype if x.is_floating_point() else original
        return cast(out, back) if isinstance(out, torch.Tensor) and back is not None else out

    def _routed(self, x, *args, **kwargs):
        routing = self.routing
        result = self.original_module(x, *args, **kwargs)
        if not isinstance(result, torch.Tensor):
            raise TypeError("route() supports modules_to_save modules that return a single tensor")
        index = routing.rows_for(result.shape[0], result.device)
        for k, name in enumerate(routing.names, start=1):
            if name in self.modules_to_save and bool((index == k).any()):
                rows = (index == k).view(-1, *([1] * (result.dim() - 1)))
                result = torch.where(rows, self._run_copy(self.modules_to_save[name], x, *args, **kwargs), result)
        return result


def float_dtype_of(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating parameter, or None when it has none."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
