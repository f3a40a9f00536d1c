"""The autograd functions behind lorakit's fast paths: same maths as the reference forward, fewer saved tensors.

- ``LoraLinearFunction``: ``x W^T + b + s (x A^T) B^T`` as one function keeping only x and ``x A^T``.
- ``SharedInputLoraFunction``: several LoRA linears that read the same x (q/k/v, gate/up) with one
  ``x [A_1; ...; A_n]^T`` product (``lorakit.layers.shared``).
- ``SiluGate``, ``GatedDownLora``, ``RmsNorm``: the fused LLaMA-style MLP and RMS norm forwards
  (``lorakit.layers.fused``), which keep fewer activations for backward.

Each is checked against the reference path (outputs and gradients) in tests/test_layers.py and
tests/test_fusions.py, and under ``torch.autocast`` in tests/test_mixed_precision_layers.py.

Each function computes in one dtype. Under autocast the callers cast every input to autocast's dtype
(``apply_in``: a differentiable cast, so a float32 adapter gets its gradient in float32) and run the function
with autocast off: the same products the reference forward gets from autocast, which casts ``F.linear``'s
inputs the same way. ``RmsNorm`` follows transformers' ``LlamaRMSNorm`` instead (float32 statistics, the
output in the input's dtype times the weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fastpath
from ..precision import autocast_off, cast


def apply_in(function: type[torch.autograd.Function], dtype: torch.dtype, *args):
    """``function.apply(*args)`` with every floating tensor argument cast to ``dtype`` (differentiably) and
    autocast off on the first argument's device: the products run in ``dtype`` exactly once."""
    device_type = args[0].device.type
    args = [cast(a, dtype) if isinstance(a, torch.Tensor) else a for a in args]
    with autocast_off(device_type):
        return function.apply(*args)


def lora_linear_forward(x2, w, bias, a, b, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2 W^T + bias + s (x2 A^T) B^T`` for a 2-D ``x2`` and (d_out, d_in) ``w``; returns it and ``x2 A^T``."""
    out = fastpath.linear(x2, w, bias)
    hidden = x2 @ a.T  # (N, r)
    out.addmm_(hidden, b.T, alpha=scaling)
    return out, hidden


def lora_linear_backward(g, x2, hidden, weight, a, b, scaling: float, fan_in_fan_out: bool, need) -> tuple:
    """Gradients of ``lora_linear_forward`` for 2-D ``g``: (x2, weight, bias, a, b), each None unless ``need``
    asks for it. The input gradient is ``g W + (s g B) A`` in one ``addmm``; the frozen W gets none. ``x2`` is
    read only for W's and A's gradients (None is fine without them)."""
    w = weight.T if fan_in_fan_out else weight
    grad_hidden = (g @ b).mul_(scaling) if need[0] or need[3] else None  # (N, r)
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need[0]:
        grad_x = (g @ w).addmm_(grad_hidden, a)
    if need[1]:
        grad_w = g.T @ x2
        grad_w = grad_w.T if fan_in_fan_out else grad_w
    if need[2]:
        grad_bias = g.sum(0)
    if need[3]:
        grad_a = (x2.T @ grad_hidden).T  # this orientation runs 1.2-2x faster on CPU BLAS
    if need[4]:
        grad_b = (g.T @ hidden).mul_(scaling)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T in one function that keeps only x and x A^T for backward.

    The update is added with one ``addmm`` (no separate scaled copy, no extra sum), and backward computes
    the input gradient as ``g W + (s g B) A`` in one ``addmm``. Weight gradients are formed only for tensors
    that require them (the frozen W never gets one).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float, fan_in_fan_out: bool):
        x2 = x.reshape(-1, x.shape[-1])
        out, hidden = lora_linear_forward(x2, weight.T if fan_in_fan_out else weight, bias, a, b, scaling)
        ctx.save_for_backward(x2, hidden, weight, a, b)
        ctx.scaling, ctx.fan_in_fan_out, ctx.in_shape, ctx.has_bias = scaling, fan_in_fan_out, x.shape, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, hidden, weight, a, b = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:5])
        need[2] = need[2] and ctx.has_bias
        grads = lora_linear_backward(
            grad.reshape(-1, grad.shape[-1]), x2, hidden, weight, a, b, ctx.scaling, ctx.fan_in_fan_out, need
        )
        grad_x = grads[0].view(ctx.in_shape) if grads[0] is not None else None
        return grad_x, *grads[1:], None, None


class SharedInputLoraFunction(torch.autograd.Function):
    """The outputs of n LoRA linear layers that read the same x, with one product ``x [A_1; ...; A_n]^T``.

    ``y_i = x W_i^T + b_i + s_i h_i B_i^T`` where ``h = x [A_1; ...; A_n]^T`` and ``h_i`` its columns of
    member i (ranks may differ). Backward sums the input gradient in place, ``g_1 W_1 + ... + g_n W_n +
    [s_1 g_1 B_1, ...] [A_1; ...; A_n]``, and forms ``[A_1; ...]``'s gradient with one product. Keeps x, h
    and the weights for backward, like the single-layer function.
    """

    @staticmethod
    def forward(ctx, x, layout, *tensors):
        ctx.set_materialize_grads(False)
        x2 = x.reshape(-1, x.shape[-1])
        weights, biases, a_list, b_list = tensors[0::4], tensors[1::4], tensors[2::4], tensors[3::4]
        a_cat = torch.cat(a_list) if len(a_list) > 1 else a_list[0]
        hidden = x2 @ a_cat.T  # (N, r_1 + ... + r_n)
        outs, start = [], 0
        for (rank, scaling), weight, bias, b in zip(layout, weights, biases, b_list, strict=True):
            out = fastpath.linear(x2, weight, bias)
            out.addmm_(hidden[:, start : start + rank], b.T, alpha=scaling)
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
            start += rank
        ctx.save_for_backward(x2, hidden, a_cat, *weights, *b_list)
        ctx.layout, ctx.in_shape, ctx.has_bias = layout, x.shape, [bias is not None for bias in biases]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.layout)
        x2, hidden, a_cat, *rest = ctx.saved_tensors
        weights, b_list = rest[:n], rest[n:]
        need = ctx.needs_input_grad
        grad_x = None
        grad_hidden = []
        member_grads: list = []
        wants_a: list[int] = []  # members whose A needs a gradient (all from one stacked product)
        start = 0
        for i, ((rank, scaling), weight, b, grad) in enumerate(zip(ctx.layout, weights, b_list, grads, strict=True)):
            w_need, bias_need, a_need, b_need = need[2 + 4 * i : 6 + 4 * i]
            if grad is None:  # this member's output was not used
                grad_hidden.append(hidden.new_zeros(hidden.shape[0], rank))
                member_grads += [None, None, None, None]
                start += rank
                continue
            g = grad.reshape(-1, grad.shape[-1])
            grad_hidden.append((g @ b).mul_(scaling))
            if need[0]:
                grad_x = g @ weight if grad_x is None else grad_x.addmm_(g, weight)
            grad_w = g.T @ x2 if w_need else None
            grad_bias = g.sum(0) if ctx.has_bias[i] and bias_need else None
            grad_b = (g.T @ hidden[:, start : start + rank]).mul_(scaling) if b_need else None
            member_grads += [grad_w, grad_bias, None, grad_b]  # A's gradient comes from the stacked product
            if a_need:
                wants_a.append(i)
            start += rank
        grad_hidden = torch.cat(grad_hidden, dim=1) if n > 1 else grad_hidden[0]
        if need[0]:
            grad_x = grad_hidden @ a_cat if grad_x is None else grad_x.addmm_(grad_hidden, a_cat)
            grad_x = grad_x.view(ctx.in_shape)
        if wants_a:
            grad_a = (x2.T @ grad_hidden).T.split([rank for rank, _ in ctx.layout])
            for i in wants_a:
                member_grads[4 * i + 2] = grad_a[i]
        return (grad_x, None, *member_grads)


class SiluGate(torch.autograd.Function):
    """``silu(g) * u`` keeping only g and u for backward (autograd would also keep ``silu(g)``)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return silu_gate_grads(grad, gate, up, ctx.needs_input_grad[:2])


def silu_gate_grads(grad, gate, up, need, silu_gate=None):
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if need[0] else None
    grad_up = (F.silu(gate) if silu_gate is None else silu_gate).mul_(grad) if need[1] else None
    return grad_gate, grad_up


class GatedDownLora(torch.autograd.Function):
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
            grad_gate, grad_up = silu_gate_grads(grad_h.view(up.shape), gate, up, need[:2], silu_gate)
        return grad_gate, grad_up, grad_w, grad_bias, grad_a, grad_b, None


class RmsNorm(torch.autograd.Function):
    """transformers' ``LlamaRMSNorm``, keeping x and the per-row rsqrt for backward: the statistics in float32,
    ``w * (x rsqrt(mean(x^2, -1) + eps)).to(x.dtype)`` (in float32 throughout for a float32 model; in a bf16
    model the normalised x is rounded to bf16 before the weight multiplies it, as transformers does)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        rstd = x32.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        normed = (x32 * rstd).to(x.dtype)
        if normed.dtype == torch.promote_types(normed.dtype, weight.dtype):
            return normed.mul_(weight)  # in place where the result keeps normed's dtype
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            normed = (x32 * rstd).to(x.dtype)  # recomputed, as the forward rounded it
            normed = normed.mul_(grad) if normed.dtype == grad.dtype else grad * normed
            grad_w = normed.reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # the normalised x's gradient, through its cast to x.dtype, in float32:
            # dx = rstd * (g w - x rstd^2 mean(g w x))
            gw = (grad * weight).to(x.dtype).float()
            dot = (gw * x32).mean(-1, keepdim=True).mul_(rstd.square())
            grad_x = gw.addcmul_(x32, dot, value=-1).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None
