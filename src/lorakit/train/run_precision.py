"""A training run's precision (``lorakit.precision``) applied: decided on the run's device, recorded, the
trained parameters cast, fp16-mixed's loss scaler."""

from __future__ import annotations

import torch
from torch import nn

from ..precision import Precision, decide
from . import distributed as dist
from .config import RunConfig


def decide_precision(cfg: RunConfig, ctx: dist.Context) -> Precision:
    """``cfg.precision`` on this run's device (``auto`` by the hardware; see ``lorakit.precision``)."""
    try:
        return decide(cfg.precision, ctx.device)
    except ValueError as err:
        raise ValueError(f"{err} (on {ctx.device})") from None


def precision_record(precision: Precision) -> dict[str, str]:
    """The resolved precision as status.json, metrics.jsonl and the trackers record it."""
    return {"precision": precision.name, "reason": precision.reason or "set in the config"}


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16-mixed's loss scaler (float16 gradients underflow without it); None for the other precisions."""
    return torch.amp.GradScaler(device.type) if precision.scaled else None


def adapter_dtype(precision: Precision | None) -> str | None:
    """``inject`` / ``load_adapter``'s adapter_dtype for ``precision``: "base" where the adapters are stored as
    the base is (pure bf16); else None, the library's default (float32 adapters over a bf16 or fp16 base)."""
    return "base" if precision is not None and precision.trained == precision.storage != torch.float32 else None


def cast_trainable(model: nn.Module, dtype: torch.dtype) -> int:
    """Every trainable floating-point parameter in ``dtype``, in place: under the mixed precisions what trains is
    float32 whatever created it (trained biases of the bf16 base, a method's own layers, a soft prompt, a full
    fine-tune's weights). A module whose bias trains keeps its frozen matrices as stored (autocast casts them
    for the product) but takes its frozen vectors along: a norm needs its weight and bias in one dtype, and
    they are small. Before the optimizer and any wrapper see them; returns how many parameters changed."""
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if not any(p.requires_grad for p in own):
                continue
            for param in own:
                if param.is_floating_point() and param.dtype != dtype and (param.requires_grad or param.dim() < 2):
                    param.data = param.data.to(dtype)
                    changed += 1
    return changed
