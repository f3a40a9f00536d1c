"""Attention in float32 for short sequences on CPUs whose bf16 attention backward is the slower one.

PyTorch's CPU flash attention multiplies bf16 with AMX tiles; on a CPU without AMX its bf16 backward carries a
large fixed cost, and for short sequences runs at half float32's speed or worse. Measured on the AVX-512 BF16
EPYC of BENCHMARKS.md (2 cores), causal, 9 query and 3 key/value heads of 64, forward / backward in ms:

| tokens x rows | float32 | bf16 |
|---|---|---|
| 64 x 16 | 1.3 / 3.1 | 1.7 / 11.0 |
| 128 x 8 | 2.3 / 5.4 | 2.6 / 10.5 |
| 256 x 4 | 4.1 / 10.0 | 4.3 / 10.5 |
| 384 x 3 | 6.1 / 16.5 | 6.9 / 17.5 |
| 512 x 2 | 7.2 / 18.3 | 7.6 / 15.1 |
| 1024 x 1 | 10.7 / 34.4 | 11.7 / 21.8 |

So attention over fewer than ``FLOAT32_BELOW`` (512) keys runs in float32 there: a bf16-mixed training step of
SmolLM2-135M at 8 x 128 tokens went from 1.68 to 1.44 s.

``fuse_forwards`` (what ``lorakit train`` runs) points a model whose attention is transformers' ``sdpa`` to
``lorakit_sdpa``: the same function, given float32 queries, keys and values when they are bf16 (or fp16) on a
CPU that ``cpu_attention_dtype`` says should, with the output cast back; everywhere else it passes straight
through. ``unfuse_forwards`` / ``unload`` point the model back to ``sdpa``. The name is not saved with the
model's config.

``LORAKIT_CPU_ATTENTION`` chooses: ``auto`` (the default: float32 below 512 keys unless the CPU has AMX),
``fp32`` (float32 below 512 keys on any CPU) or ``bf16`` (always the precision's own dtype).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from .precision import LOW_PRECISION, autocast_off, cpu_flags

NAME = "lorakit_sdpa"
CHOICES = ("auto", "fp32", "bf16")
FLOAT32_BELOW = 512  # keys; above this bf16's backward is as fast or faster (table above)


def cpu_attention_dtype(flags: frozenset[str] | None = None) -> torch.dtype | None:
    """float32 when this CPU's attention on short bf16 sequences should run in float32, None to keep the
    inputs' dtype. ``flags`` stands in for /proc/cpuinfo's in tests.

    Raises:
        ValueError: LORAKIT_CPU_ATTENTION is not one of auto, fp32, bf16.
    """
    choice = os.environ.get("LORAKIT_CPU_ATTENTION", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"LORAKIT_CPU_ATTENTION={choice!r} is not one of {', '.join(CHOICES)}; unset it for auto")
    if choice == "auto":
        flags = cpu_flags() if flags is None else flags
        choice = "bf16" if "amx_bf16" in flags else "fp32"
    return torch.float32 if choice == "fp32" else None


@functools.cache
def _cpu_choice() -> torch.dtype | None:
    return cpu_attention_dtype()


def sdpa_float32_on_cpu(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, computed in float32 for bf16/fp16 inputs over fewer than FLOAT32_BELOW keys
    on a CPU that needs it (``cpu_attention_dtype``); otherwise exactly transformers' function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        query.device.type != "cpu"
        or query.dtype not in LOW_PRECISION
        or key.shape[-2] >= FLOAT32_BELOW
        or _cpu_choice() is None
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = query.dtype
    query, key, value, attention_mask = (_float32(t) for t in (query, key, value, attention_mask))
    kwargs = {k: _float32(v) for k, v in kwargs.items()}  # a position bias (T5) joins the mask inside
    with autocast_off("cpu"):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out.to(dtype), weights


def _float32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION else value


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_float32_on_cpu)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _configs(model: nn.Module) -> list:
    """The distinct transformers configs of ``model``'s modules (a composite model has several)."""
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


def use_lorakit_attention(model: nn.Module) -> int:
    """Point every config of ``model`` whose attention is ``sdpa`` to ``lorakit_sdpa``; returns how many."""
    configs = [c for c in _configs(model) if c._attn_implementation == "sdpa"]
    if configs:
        _register()
    for config in configs:
        config._attn_implementation = NAME
    return len(configs)


def restore_attention(model: nn.Module) -> int:
    """Point every config of ``model`` on ``lorakit_sdpa`` back to ``sdpa``; returns how many."""
    configs = [c for c in _configs(model) if c._attn_implementation == NAME]
    for config in configs:
        config._attn_implementation = "sdpa"
    return len(configs)
