"""Leaner training forwards for the modules around LoRA layers: same maths, fewer passes and saved tensors.

``inject`` gives them to a model's LLaMA-style gated MLPs and RMS norms (recognised by their forward's
bytecode, so Mistral, Qwen2, SmolLM and the other copies qualify); unloading the adapters takes them away.
They act only while gradients are on: inference runs the model's own forwards, bit for bit.

- Gated MLP, ``down(silu(gate(x)) * up(x))``: autograd would keep gate, up, ``silu(gate)`` and the product
  that enters down_proj. Here silu's backward keeps gate and up only, and when down_proj is a LoRA layer on
  the fused path, its input (``silu(gate) * up``) is recomputed in backward from those same two tensors
  instead of being kept: two intermediate-size activations fewer per layer (for SmolLM2-135M at 8 x 128
  tokens, 12.6 MB a layer, 380 MB in all) for one extra elementwise product in backward.
- RMS norm, ``w * x / sqrt(mean(x^2) + eps)``: one function keeping x and the per-row ``1/sqrt(...)``,
  with a three-pass backward; autograd's graph of the same expression takes about twice as long on CPU.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LoraLayer, LoraLinear, lora_linear_backward, lora_linear_forward


class _SiluGate(torch.autograd.Function):
    """``silu(g) * u`` keeping only g and u for backward (autograd would also keep ``silu(g)``)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _silu_gate_grads(grad, gate, up, ctx.needs_input_grad[:2])


def _silu_gate_grads(grad, gate, up, need, silu_gate=None):
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if need[0] else None
    grad_up = (F.silu(gate) if silu_gate is None else silu_gate).mul_(grad) if need[1] else None
    return grad_gate, grad_up


class _GatedDownLora(torch.autograd.Function):
    """``down(silu(g) * u)`` for a LoRA down projection, keeping g and u but not their product (recomputed)."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, a, b, scaling: float):
        h = F.silu(gate).mul_(up)
        h2 = h.view(-1, h.shape[-1])
        out, hidden = lora_linear_forward(h2, weight, bias, a, b, scaling)
        ctx.save_for_backward(gate, up, hidden, weight, a, b)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return out.view(*h.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        gate, up, hidden, weight, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        silu_gate = F.silu(gate)
        want = (need[0] or need[1], need[2], need[3] and ctx.has_bias, need[4], need[5])
        # down_proj's input, recomputed: only W's and A's gradients read it
        h2 = (silu_gate * up).view(-1, up.shape[-1]) if want[1] or want[3] else None
        grad_h, grad_w, grad_bias, grad_a, grad_b = lora_linear_backward(
            grad.reshape(-1, grad.shape[-1]), h2, hidden, weight, a, b, ctx.scaling, False, want
        )
        del h2
        grad_gate = grad_up = None
        if grad_h is not None:
            grad_gate, grad_up = _silu_gate_grads(grad_h.view(up.shape), gate, up, need[:2], silu_gate)
        return grad_gate, grad_up, grad_w, grad_bias, grad_a, grad_b, None


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
    name = down._fused_adapter(gate, (), {}) if type(down) is LoraLinear and not _has_hooks(down) else None
    if name is None:
        return down(_SiluGate.apply(gate, up))
    base = down.base_layer
    a, b = down.lora_A[name].weight, down.lora_B[name].weight
    return _GatedDownLora.apply(gate, up, base.weight, base.bias, a, b, down.scaling[name])


def _is_llama_style_mlp(module: nn.Module) -> bool:
    """A module whose forward is exactly LlamaMLP's (same bytecode and names) with a SiLU activation."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    return _same_forward(module, LlamaMLP) and isinstance(getattr(module, "act_fn", None), nn.SiLU | SiLUActivation)


def _same_forward(module: nn.Module, reference: type) -> bool:
    forward = getattr(type(module), "forward", None)
    code, ref = getattr(forward, "__code__", None), reference.forward.__code__
    return code is not None and code.co_code == ref.co_code and code.co_names == ref.co_names


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give LLaMA-style MLPs that hold LoRA layers the leaner forward (same maths); returns how many."""
    count = 0
    for module in model.modules():
        if "forward" in module.__dict__ or not _is_llama_style_mlp(module):
            continue
        if any(isinstance(module._modules.get(n), LoraLayer) for n in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_gated_mlp_forward, module)
            count += 1
    return count


class _RmsNorm(torch.autograd.Function):
    """``w * x * rsqrt(mean(x^2, -1) + eps)`` keeping x and the per-row rsqrt for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x).mul_(rstd).reshape(-1, x.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            # dx = rstd * (g w - x rstd^2 mean(g w x))
            gw = grad * weight
            dot = (gw * x).mean(-1, keepdim=True).mul_(rstd.square())
            grad_x = gw.addcmul_(x, dot, value=-1).mul_(rstd)
        return grad_x, grad_w, None


def _rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if not torch.is_grad_enabled() or not (x.dtype == weight.dtype == torch.float32) or _has_hooks(self):
        return type(self).forward(self, x)
    return _RmsNorm.apply(x, weight, float(self.variance_epsilon))


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


def fuse_rms_norms(model: nn.Module) -> int:
    """Give the model's LLaMA-style RMS norms the one-function forward (same maths); returns how many."""
    count = 0
    for module in model.modules():
        if "forward" not in module.__dict__ and _is_llama_style_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward, module)
            count += 1
    return count


def fuse(model: nn.Module) -> int:
    """All of this module's fusions for a model that now holds LoRA layers; returns how many modules changed."""
    return fuse_gated_mlps(model) + fuse_rms_norms(model)


def unfuse(model: nn.Module) -> None:
    """Give every fused module its own forward back."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) in (_gated_mlp_forward, _rms_norm_forward):
            del module.forward
