"""LoRA as a method: lorakit's own inject / save_adapter / load_adapter."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import LoraConfig
from ..inject import inject
from ..io import CONFIG_NAME, adapter_tensors, read_adapter, save_adapter
from ..layers import AdapterDtype
from ..state import registry


class LoraMethod:
    name = "lora"

    def __init__(self, config: LoraConfig | None = None, adapter_dtype: AdapterDtype = None) -> None:
        """``adapter_dtype``: ``inject``'s (None: float32 adapters over a bf16 / fp16 base; "base": the base's
        dtype, for pure bf16 training)."""
        self.config = config or LoraConfig(r=16, alpha=32, target_modules="all-linear")
        self.adapter_dtype = adapter_dtype

    def prepare(self, model: nn.Module) -> nn.Module:
        return inject(model, self.config, adapter_dtype=self.adapter_dtype)

    def save(self, trained: nn.Module, directory: Path, values: dict | None = None) -> Path:
        """``values``: the trained tensors by parameter name, gathered from a sharded model (FSDP)."""
        return save_adapter(trained, directory, values=values)

    def restore(self, prepared: nn.Module, directory: Path) -> nn.Module:
        import torch

        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"{directory} holds no adapter")
        _, tensors = read_adapter(directory)
        pissa = registry(prepared).adapters["default"].config.init == "pissa"
        with torch.no_grad():
            for key, target in adapter_tensors(prepared, "default").items():
                source = tensors.get(key)
                if pissa and source is not None and source.shape != target.shape:
                    source = _trained_part_of_pissa(source, target.shape)
                if source is None or source.shape != target.shape:
                    raise ValueError(f"{directory}: {key} is missing or has another shape")
                target.copy_(source)
        return prepared


def _trained_part_of_pissa(saved, shape):
    """A PiSSA adapter is saved converted, ``[A; A_0]`` and ``[B, -B_0]``: the trained A and B lead."""
    if saved.dim() == 2 and saved.shape[0] == 2 * shape[0] and saved.shape[1] == shape[1]:
        return saved[: shape[0]]
    if saved.dim() == 2 and saved.shape[1] == 2 * shape[1] and saved.shape[0] == shape[0]:
        return saved[:, : shape[1]]
    return None
