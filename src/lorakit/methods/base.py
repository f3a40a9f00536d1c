"""The method interface and the helpers its implementations share."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from ..io import write_safetensors


class Method(Protocol):
    name: str

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make ``model`` trainable the method's way (in place where possible); return the module to train."""

    def save(self, trained: nn.Module, directory: Path, values: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the trained state to ``directory`` (safetensors) and return it. ``values``: the trainable tensors
        by name when ``trained`` holds only this process's shards of them (FSDP; ``fsdp.gathered_trainable``),
        else None (read from ``trained``)."""

    def restore(self, prepared: nn.Module, directory: Path) -> nn.Module:
        """Load state written by ``save`` into a model that ``prepare`` produced; return it."""


class TrainableStateMethod:
    """For methods whose whole state is the trainable parameters, kept in one safetensors file."""

    state_file = "trainable.safetensors"

    def save(self, trained: nn.Module, directory: Path, values: dict[str, torch.Tensor] | None = None) -> Path:
        save_trainable(trained, directory / self.state_file, values)
        return directory

    def restore(self, prepared: nn.Module, directory: Path) -> nn.Module:
        restore_trainable(prepared, directory / self.state_file)
        return prepared


def save_trainable(module: nn.Module, path: Path, values: dict[str, torch.Tensor] | None = None) -> Path:
    """Trainable parameters by name (``values`` when given: gathered from shards), as one safetensors file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if values is None:
        values = {n: p for n, p in module.named_parameters() if p.requires_grad}
    tensors = {n: p.detach().cpu().contiguous() for n, p in values.items()}
    write_safetensors(tensors, path)
    return path


def restore_trainable(module: nn.Module, path: Path) -> None:
    """Copy tensors written by ``save_trainable`` back, checking names and shapes."""
    tensors = load_file(str(path))
    params = dict(module.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"{path} holds tensors this model lacks: {missing[:3]}; was it saved from another model?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, model {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def hidden_size(model: nn.Module) -> int:
    config = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} from its config")
