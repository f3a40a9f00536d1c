"""lorakit: LoRA fine-tuning for PyTorch and transformers models, with PEFT-compatible adapter files."""

from .adapters import (
    TrainableSummary,
    active_adapters,
    delete_adapter,
    disabled,
    merge,
    route,
    set_active,
    trainable_summary,
    unload,
    unmerge,
)
from .config import LoraConfig
from .inject import inject
from .io import load_adapter, save_adapter
from .models import load_model

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "TrainableSummary",
    "__version__",
    "active_adapters",
    "delete_adapter",
    "disabled",
    "inject",
    "load_adapter",
    "load_model",
    "merge",
    "route",
    "save_adapter",
    "set_active",
    "trainable_summary",
    "unload",
    "unmerge",
]
