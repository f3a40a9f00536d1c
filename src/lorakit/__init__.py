"""lorakit: LoRA fine-tuning for PyTorch and transformers models, with PEFT-compatible adapter files."""

from .adapters import (
    TrainableSummary,
    active_adapters,
    delete_adapter,
    disabled,
    merge,
    route,
    set_active,
    switched_off,
    trainable_summary,
    unload,
    unmerge,
)
from .analysis import inspect_adapter
from .combine import combine
from .config import LoraConfig
from .inject import inject
from .io import load_adapter, save_adapter
from .layers import fuse_forwards
from .models import load_model
from .quant import dequantize, quantize
from .train.fused_loss import causal_lm_loss

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "TrainableSummary",
    "__version__",
    "active_adapters",
    "causal_lm_loss",
    "combine",
    "delete_adapter",
    "dequantize",
    "disabled",
    "fuse_forwards",
    "inject",
    "inspect_adapter",
    "load_adapter",
    "load_model",
    "merge",
    "quantize",
    "route",
    "save_adapter",
    "set_active",
    "switched_off",
    "trainable_summary",
    "unload",
    "unmerge",
]
