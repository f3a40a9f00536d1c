"""LoRA as a method: lorakit's own inject / save_adapter / load_adapter."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import LoraConfig
from ..inject import inject
from ..io import CONFIG_NAME, read_adapter, save_adapter


class LoraMethod:
    name = "lora"

    def __init__(self, config: LoraConfig | None = None) -> None:
        self.config = config or LoraConfig(r=16, alpha=32, target_modules="all-linear")

    def prepare(self, model: nn.Module) -> nn.Module:
        return inject(model, self.config)

    def save(self, trained: nn.Module, directory: Path) -> Path:
        return save_adapter(trained, directory)

    def restore(self, prepared: nn.Module, directory: Path) -> nn.Module:
        import torch

        from ..io import adapter_tensors

        if not (directory / CONFIG_NAME).is_file():
            raise ValueError(f"{directory} holds no adapter")
        _, tensors = read_adapter(directory)
        with torch.no_grad():
            for key, target in adapter_tensors(prepared, "default").items():
                if key not in tensors or tensors[key].shape != target.shape:
                    raise ValueError(f"{directory}: {key} is missing or has another shape")
                target.copy_(tensors[key])
        return prepared
