"""The optimizer of a training run: AdamW (fused where PyTorch can), LoRA+'s learning rate for B, and the
learning-rate schedule (linear warmup, then constant, linear or cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import RunConfig


def _schedule(cfg: RunConfig):
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.scheduler == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return max(0.0, 1 - progress) if t.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def adamw(groups: list, **kwargs) -> torch.optim.AdamW:
    """AdamW, as PyTorch's fused kernel (one pass over all parameters) where it supports the parameters:
    floating point, all on one CPU or CUDA device. Same update as the default implementation, to rounding;
    on the benchmark's 4.9 M LoRA parameters 11 ms a step against 60 ms on CPU."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = (
        bool(params)
        and len({p.device for p in params}) == 1
        and params[0].device.type in ("cpu", "cuda")
        and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    )
    return torch.optim.AdamW(groups, fused=fused, **kwargs)


def build_optimizer(
    model: nn.Module, cfg: RunConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters; with LoRA+ the B matrices get lr * loraplus_lr_ratio."""
    t = cfg.train
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = t.loraplus_lr_ratio
    is_b = [".lora_B." in n or ".lora_embedding_B." in n for n, _ in params]
    groups = [{"params": [p for (_, p), b in zip(params, is_b, strict=True) if not b or ratio is None], "lr": t.lr}]
    if ratio is not None:
        groups.append({"params": [p for (_, p), b in zip(params, is_b, strict=True) if b], "lr": t.lr * ratio})
    optimizer = adamw(groups, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    return optimizer, scheduler
