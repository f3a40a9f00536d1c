"""Attention for short bf16 sequences on CPUs without AMX: bf16 matrix products with a softmax of their own.

PyTorch's CPU flash attention multiplies bf16 with AMX tiles; on a CPU without AMX its bf16 backward carries a
large fixed cost, and for short sequences runs at half float32's speed or worse. lorakit computes those
attentions as transformers' eager attention does in bf16 (scores = Q K^T as a bf16 matrix product, softmax
accumulated in float32, output = P V), in one autograd function (``MatmulAttention``) that saves only its inputs
and recomputes the scores in the backward, so it keeps no (tokens x keys) matrix between forward and backward.
Measured on the AVX-512 BF16 EPYC of BENCHMARKS.md (2 cores), causal, 9 query and 3 key/value heads of 64,
forward + backward in ms:

| tokens x rows | flash float32 | flash bf16 | matmul bf16 |
|---|---|---|---|
| 64 x 16 | 4.4 | 12.7 | 1.6 |
| 128 x 8 | 7.7 | 13.1 | 3.0 |
| 256 x 4 | 14.1 | 14.8 | 5.1 |
| 512 x 2 | 25.5 | 22.7 | 10.6 |
| 1024 x 1 | 45.1 | 33.5 | 49.4 |

So attention over fewer than ``MATMUL_BELOW`` (1024) keys runs as bf16 products there; longer attention keeps
PyTorch's flash kernel in bf16, where its backward is the faster one. The products round the scores to bf16 as
transformers' eager attention does; against float32 maths the output and gradients differ by about 0.4 %
(relative), as flash attention in bf16 does.

``fuse_forwards`` (what ``lorakit train`` runs) points a model whose attention is transformers' ``sdpa`` to
``lorakit_sdpa``: the function here, which passes straight to transformers' ``sdpa`` everywhere it does not apply
(GPUs, float32, long sequences, dropout, position biases, a per-head mask). ``unfuse_forwards`` / ``unload``
point the model back to ``sdpa``. The name is not saved with the model's config.

``LORAKIT_CPU_ATTENTION`` chooses: ``auto`` (the default: ``matmul`` unless the CPU has AMX, then ``bf16``),
``matmul`` (bf16 products below 1024 keys on any CPU), ``fp32`` (PyTorch's flash kernel in float32 below 512
keys) or ``bf16`` (PyTorch's flash kernel in the precision's own dtype, always).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from .precision import LOW_PRECISION, autocast_off, cpu_flags

NAME = "lorakit_sdpa"
CHOICES = ("auto", "matmul", "fp32", "bf16")
MATMUL_BELOW = 1024  # keys; from here PyTorch's bf16 flash kernel is the faster (table above)
FLOAT32_BELOW = 512  # keys, for ``fp32``: above this bf16's flash backward is as fast or faster


def cpu_attention_mode(flags: frozenset[str] | None = None) -> str:
    """``matmul``, ``fp32`` or ``bf16``: how this CPU computes short bf16 attention (module docstring).
    ``flags`` stands in for /proc/cpuinfo's in tests.

    Raises:
        ValueError: LORAKIT_CPU_ATTENTION is not one of auto, matmul, fp32, bf16.
    """
    choice = os.environ.get("LORAKIT_CPU_ATTENTION", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"LORAKIT_CPU_ATTENTION={choice!r} is not one of {', '.join(CHOICES)}; unset it for auto")
    if choice == "auto":
        flags = cpu_flags() if flags is None else flags
        choice = "bf16" if "amx_bf16" in flags else "matmul"
    return choice


@functools.cache
def _cpu_choice() -> str:
    return cpu_attention_mode()


def lorakit_sdpa(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, computed as bf16 products (``MatmulAttention``) or in float32 for short bf16
    sequences on a CPU that needs it (``cpu_attention_mode``); otherwise exactly transformers' function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mode = _cpu_choice() if query.device.type == "cpu" and query.dtype in LOW_PRECISION else "bf16"
    if mode == "matmul" and query.dtype == torch.bfloat16 and key.shape[-2] < MATMUL_BELOW:
        out = _matmul_attention(module, query, key, value, attention_mask, **kwargs)
        if out is not None:
            return out, None
    if mode == "bf16" or key.shape[-2] >= FLOAT32_BELOW:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = query.dtype
    query, key, value, attention_mask = (_float32(t) for t in (query, key, value, attention_mask))
    kwargs = {k: _float32(v) for k, v in kwargs.items()}  # a position bias (T5) joins the mask inside
    with autocast_off("cpu"):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out.to(dtype), weights


def _float32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION else value


def _matmul_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, position_bias=None, **kwargs
) -> torch.Tensor | None:
    """transformers' ``sdpa_attention_forward`` as ``MatmulAttention``, in its output layout (batch, tokens,
    heads, dim); None where that function does something this one does not (dropout, a position bias, softcap,
    attention weights asked for, a per-head mask, heads that do not divide)."""
    _, heads, tokens, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    unsupported = (
        dropout
        or position_bias is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("output_attentions")
        or heads % kv_heads
        or value.shape[-1] != dim
        or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1))
    )
    if unsupported:
        return None
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = tokens > 1 and attention_mask is None and is_causal
    if is_causal and keys > tokens:  # as transformers: a prefill into an empty static cache
        key, value, keys = key[:, :, :tokens], value[:, :, :tokens], tokens
    groups = heads // kv_heads
    bias = _bias(attention_mask, is_causal, groups, tokens, keys, query.dtype, query.device)
    scale = dim**-0.5 if scaling is None else scaling
    with autocast_off("cpu"):
        out = MatmulAttention.apply(query, key.contiguous(), value.contiguous(), bias, scale)
    return out.transpose(1, 2).contiguous()


def _bias(mask, is_causal: bool, groups: int, tokens: int, keys: int, dtype, device) -> torch.Tensor | None:
    """The additive mask in ``dtype``, laid out as the scores' (batch or 1, 1, groups x tokens, keys); None when
    every key is seen."""
    if mask is None:
        return _causal_bias(groups, tokens, keys, dtype, device) if is_causal else None
    version = -1 if mask.is_inference() else mask._version  # inference tensors keep no version (nor change)
    key = (version, groups, tokens, keys, dtype)  # every layer of a forward gets the same mask tensor
    if _LAST_BIAS and _LAST_BIAS[0] is mask and _LAST_BIAS[1] == key:
        return _LAST_BIAS[2]
    _LAST_BIAS[:] = [mask, key, _padded_bias(mask, groups, tokens, keys, dtype, device)]
    return _LAST_BIAS[2]


_LAST_BIAS: list = []  # [mask, its key, its bias]: built once per forward, not once per layer


def _padded_bias(mask, groups: int, tokens: int, keys: int, dtype, device) -> torch.Tensor:
    if mask.dtype == torch.bool:  # True = attend; the dtype's lowest value, not -inf, keeps a row of pads finite
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    else:  # a float32 mask's lowest value is -inf in bf16: a row of pads would give NaN
        mask = mask.clamp(min=torch.finfo(dtype).min).to(dtype)
    mask = mask.expand(-1, 1, tokens, keys)
    return mask.repeat(1, 1, groups, 1) if groups > 1 else mask


@functools.lru_cache(maxsize=8)
def _causal_bias(groups: int, tokens: int, keys: int, dtype, device) -> torch.Tensor:
    causal = torch.full((tokens, keys), float("-inf"), dtype=dtype, device=device).triu_(keys - tokens + 1)
    return causal.repeat(groups, 1).view(1, 1, groups * tokens, keys)


class MatmulAttention(torch.autograd.Function):
    """softmax(scale Q K^T + bias) V with bf16 products and a float32-accumulated softmax, grouped-query heads
    without repeating K and V. Saves Q, K, V and the bias; the backward recomputes the probabilities.

    Shapes: query (B, H, T, D), key and value (B, KV, S, D) with H a multiple of KV, bias None or broadcastable to
    (B, KV, H/KV x T, S). Returns (B, H, T, D).
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, scale: float):
        batch, heads, tokens, dim = query.shape
        grouped = query.reshape(batch, key.shape[1], -1, dim)  # (B, KV, groups x T, D): one product per KV head
        probs = torch.softmax(_scores(grouped, key, bias, scale), -1)
        ctx.save_for_backward(grouped, key, value, bias)
        ctx.scale = scale
        return torch.matmul(probs, value).view(batch, heads, tokens, value.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        grouped, key, value, bias = ctx.saved_tensors
        probs = torch.softmax(_scores(grouped, key, bias, ctx.scale), -1)
        grad_grouped = grad.reshape(grouped.shape[:3] + grad.shape[-1:])
        grad_probs = torch.matmul(grad_grouped, value.transpose(-1, -2))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_query = torch.matmul(grad_scores, key).mul_(ctx.scale).view(grad.shape)
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), grouped).mul_(ctx.scale)
        grad_value = torch.matmul(probs.transpose(-1, -2), grad_grouped)
        return grad_query, grad_key, grad_value, None, None


def _scores(grouped, key, bias, scale: float) -> torch.Tensor:
    scores = torch.matmul(grouped, key.transpose(-1, -2))
    return scores.mul_(scale) if bias is None else torch.add(bias, scores, alpha=scale)


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, lorakit_sdpa)
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
