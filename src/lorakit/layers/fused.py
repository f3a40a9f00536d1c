"""Fused training forwards for the modules around LoRA layers: same maths, fewer passes and saved tensors.

An option, not a default of ``inject``: ``lorakit.fuse_forwards(model)`` gives them to a model's LLaMA-style
gated MLPs and RMS norms (recognised by their forward's bytecode, so Mistral, Qwen2, SmolLM and the other
copies qualify), ``lorakit train`` calls it, ``print(model)`` shows ``lorakit: fused gated MLP`` /
``lorakit: fused RMS norm`` on each module it changed (``lorakit.patches``), and ``unload`` takes them away.
They act only while gradients are on: inference runs the model's own forwards, bit for bit.

- Gated MLP, ``down(silu(gate(x)) * up(x))``: autograd would keep gate, up, ``silu(gate)`` and the product
  that enters down_proj. Here silu's backward keeps gate and up only, and when down_proj is a LoRA layer on
  the fused path, its input (``silu(gate) * up``) is recomputed in backward from those same two tensors
  instead of being kept: two intermediate-size activations fewer per layer (for SmolLM2-135M at 8 x 128
  tokens, 12.6 MB a layer, 380 MB in all) for one extra elementwise product in backward.
- RMS norm, ``w * x / sqrt(mean(x^2) + eps)``: one function keeping x and the per-row ``1/sqrt(...)``,
  with a three-pass backward; autograd's graph of the same expression takes about twice as long on CPU.
  For a float32, bfloat16 or float16 x and weight, computed as transformers' ``LlamaRMSNorm`` does (float32
  statistics, the normalised x back in x's dtype, times the weight).

Both also run under ``torch.autocast`` (bf16-mixed training): the down projection's fused function then
computes in autocast's dtype like the LoRA fast path (``lorakit.layers.linear``); the RMS norm has no
operation autocast changes (its statistics are float32 already), so it computes as without autocast.
- Attention: a model on transformers' ``sdpa`` is pointed to ``lorakit_sdpa``, which computes bf16 attention
  in float32 on CPUs whose bf16 attention backward is the slower one (``lorakit.attention``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import restore_attention, use_lorakit_attention
from ..patches import patch_forward, patched, remove_patches
from ..precision import autocast_off
from .base import LoraLayer
from .kernels import GatedDownLora, RmsNorm, SiluGate, apply_in
from .linear import LoraLinear

GATED_MLP = "fused gated MLP"
RMS_NORM = "fused RMS norm"


def fuse_forwards(model: nn.Module) -> list[str]:
    """Give the LLaMA-style gated MLPs that hold LoRA layers, and the LLaMA-style RMS norms, of ``model`` their
    fused training forward (same maths, fewer saved tensors; see the module docstring), and its sdpa
    attention lorakit's (float32 on CPUs where bf16's backward is slower; ``lorakit.attention``).

    Returns the paths of every module that now runs a fused forward (also those fused before). ``unload``,
    or ``unfuse_forwards``, gives them their own forwards and the model its attention back.
    """
    use_lorakit_attention(model)
    for module in model.modules():
        if _is_llama_style_mlp(module) and _holds_lora(module):
            patch_forward(module, _gated_mlp_forward, GATED_MLP)
        elif _is_llama_style_rms_norm(module):
            patch_forward(module, _rms_norm_forward, RMS_NORM)
    return patched(model, GATED_MLP) + patched(model, RMS_NORM)


def unfuse_forwards(model: nn.Module) -> int:
    """Give every fused module its own forward, and the model its own attention, back; returns how many modules."""
    restore_attention(model)
    return remove_patches(model, GATED_MLP) + remove_patches(model, RMS_NORM)


def _holds_lora(module: nn.Module) -> bool:
    return any(isinstance(module._modules.get(n), LoraLayer) for n in ("gate_proj", "up_proj", "down_proj"))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaMLP's forward, ``down(silu(gate(x)) * up(x))``, with fewer tensors kept for backward."""
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != up.dtype or gate.shape != up.shape:
        return self.down_proj(self.act_fn(gate) * up)
    down = self.down_proj
    plan = down.fast_path_adapter(gate, (), {}) if type(down) is LoraLinear and not _has_hooks(down) else None
    if plan is None:
        return down(SiluGate.apply(gate, up))
    name, dtype = plan
    base = down.base_layer
    a, b = down.lora_A[name].weight, down.lora_B[name].weight
    return apply_in(GatedDownLora, dtype, gate, up, base.weight, base.bias, a, b, down.scaling[name])


def _is_llama_style_mlp(module: nn.Module) -> bool:
    """A module whose forward is exactly LlamaMLP's (same bytecode and names) with a SiLU activation."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    return _same_forward(module, LlamaMLP) and isinstance(getattr(module, "act_fn", None), nn.SiLU | SiLUActivation)


def _same_forward(module: nn.Module, reference: type) -> bool:
    forward = getattr(type(module), "forward", None)
    code, ref = getattr(forward, "__code__", None), reference.forward.__code__
    return code is not None and code.co_code == ref.co_code and code.co_names == ref.co_names


RMS_NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's forward by one autograd function (the model's own for inference, hooks, other dtypes)."""
    weight = self.weight
    if not torch.is_grad_enabled() or _has_hooks(self):
        return type(self).forward(self, x)
    if x.dtype not in RMS_NORM_DTYPES or weight.dtype not in RMS_NORM_DTYPES:
        return type(self).forward(self, x)
    with autocast_off(x.device.type):  # autocast changes none of the reference's operations (float32 inputs)
        return RmsNorm.apply(x, weight, float(self.variance_epsilon))


def _is_llama_style_rms_norm(module: nn.Module) -> bool:
    """A module whose forward is exactly LlamaRMSNorm's, with a 1-D weight and an epsilon."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    weight = getattr(module, "weight", None)
    return (
        _same_forward(module, LlamaRMSNorm)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float | int)
    )
