"""Inference weights: the frozen base's linear layers as int8 weight-only products, fewer bytes per token.

Decoding one row reads every weight of the model once per token: on a CPU one stream is bound by the bytes
read, not by arithmetic. ``quantize_int8(model)`` replaces each ``nn.Linear`` of the base model (the output head
included, adapters and ``modules_to_save`` copies excluded) with an ``Int8Linear``: the weight rounded to int8
with one float scale per output channel (symmetric, ``scale = max |w_row| / 127``), a quarter of float32's
bytes and half of bfloat16's. Its product is PyTorch's own weight-only int8 kernel,
``torch._weight_int8pack_mm`` (bf16 activations times int8 weights, the scales applied to the output), which on
this project's CPUs runs a one-row product 3-7x faster than float32 (BENCHMARKS.md). The activations enter it
in bfloat16 (with float32 activations the kernel is 4-8x slower than float32's own product) and the output
leaves in the dtype the layer was called with (or autocast's).

PyTorch's kernel was chosen over torchao's ``Int8WeightOnlyConfig`` after measuring both on the model's shapes:
torchao 0.18 in eager mode on a CPU ran one row 6.6x slower (576 -> 1536: 0.132 against 0.020 ms) and the
49152-row head 100x slower (40.1 against 0.39 ms), and it would be one more dependency (BENCHMARKS.md).

The adapters stay unmerged and routable beside the int8 base (``Int8Linear`` is an ``nn.Linear`` to ``inject``,
whose reference path adds the adapters' float32 or bf16 updates to the int8 product). A merge into an int8 base
is refused (``layers.base.refuse_quantized_merge``): the merged weight would have to be rounded again.

Rounding moves each output by at most half a scale step per weight; what that does to answers is measured:
exact match on the demo's held-out dates in every weight mode (BENCHMARKS.md, tests/test_weights.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .state import LoraLayer, ModulesToSave

DEQUANTIZE_ROWS = 64
"""Rows at and above which ``Int8Linear`` multiplies a bf16 copy of its weight, made for the call, instead of
running the weight-only kernel, whose time grows in proportion to the rows (a prefill's prompt tokens)."""
DEQUANTIZE_MAX_NUMEL = 1 << 23
"""...but only for weights of up to this many entries: a vocabulary-sized head's copy costs more than it saves
(49152 x 576: 44 ms to copy and multiply 320 rows against 70 ms in the kernel, 47 against 9 ms for 40 rows)."""

WEIGHT_MODES = ("auto", "precision", "int8")
"""``--weights``: ``precision``, the base as the precision stores it (float32 or bfloat16); ``int8``, int8
weight-only linear layers; ``auto``, int8 where the precision computes in bf16 on a CPU that multiplies bf16
natively (AVX-512 BF16 or AMX), else as the precision stores it."""


class Int8Linear(nn.Linear):
    """A frozen linear layer holding int8 weights and per-output-channel scales (see the module docstring).
    ``weight`` is the int8 tensor (so device and shape read as for any linear layer); ``compute_dtype`` is the
    float dtype the layer stood for (``_bnb.float_dtype`` reads it: the adapters' dtype policy follows it)."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        weight = linear.weight.detach().float()
        # the kernel takes bf16 scales: round them first (a hair up, so the row's largest entry stays within 127)
        # and quantize against the rounded ones, so each entry is off by at most half a step of its own scale
        scale = (weight.abs().amax(dim=1) * (1 + 2**-8) / 127).clamp(min=1e-30).to(torch.bfloat16)
        quantized = torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight = nn.Parameter(quantized.contiguous(), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        if rows.shape[0] >= DEQUANTIZE_ROWS and self.weight.numel() <= DEQUANTIZE_MAX_NUMEL:
            # a prefill's many rows: the kernel's time grows with the rows; one bf16 product over the weight
            # dequantized for this call is 2-2.5x faster from 64 rows on (320 rows of 3072 x 576: 1.9 vs 3.8 ms)
            out = F.linear(rows, self.weight.to(torch.bfloat16) * self.scale[:, None])
        else:
            out = torch._weight_int8pack_mm(rows.contiguous(), self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(out_dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight the int8 values and scales stand for, as float32 (d_out, d_in)."""
        return self.weight.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 weights (per-channel scales), bf16 activations"


@dataclass
class Int8Report:
    layers: int
    bytes_before: int
    bytes_after: int

    def describe(self) -> str:
        return (
            f"int8 weights: {self.layers} linear layers, {self.bytes_before / 1e6:.1f} MB -> "
            f"{self.bytes_after / 1e6:.1f} MB"
        )


def int8_supported(device: torch.device | str) -> bool:
    """Whether PyTorch's weight-only int8 product runs on ``device`` (tried once on a tiny product)."""
    try:
        x = torch.zeros(1, 32, dtype=torch.bfloat16, device=device)
        w = torch.zeros(32, 32, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(x, w, torch.ones(32, dtype=torch.bfloat16, device=device))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def quantize_int8(model: nn.Module) -> Int8Report:
    """Replace the base model's ``nn.Linear`` layers with ``Int8Linear`` (in place; see the module docstring).
    Adapter factors and ``modules_to_save`` copies stay as they are. Returns what changed."""
    targets: list[tuple[nn.Module, str, nn.Linear]] = []
    skip: set[int] = set()
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            skip.update(id(m) for m in module.modules())
        elif isinstance(module, LoraLayer):
            skip.update(id(m) for m in module.modules() if m is not module.base_layer)
    for parent in model.modules():
        if id(parent) in skip and not isinstance(parent, LoraLayer):
            continue
        for name, child in parent.named_children():
            if type(child) is nn.Linear and id(child) not in skip:
                targets.append((parent, name, child))
    before = after = 0
    for parent, name, child in targets:
        before += child.weight.numel() * child.weight.element_size()
        layer = Int8Linear(child)
        after += layer.weight.numel() + layer.scale.numel() * layer.scale.element_size()
        setattr(parent, name, layer)
    return Int8Report(len(targets), before, after)


def resolve_weights(
    mode: str, device: torch.device, native_bf16: bool, precision: str = "bf16-mixed"
) -> tuple[str, str]:
    """(``precision`` or ``int8``, the reason) for ``--weights mode`` on ``device`` under the resolved
    ``precision``; ``native_bf16``: whether the device multiplies bf16 natively (``lorakit.precision``'s hardware
    check). ``auto`` takes int8 only where the precision computes in bf16 already: fp32 stays float32.

    The products should run on the thread that loaded the model: on a CPU, a second thread ran int8's many small
    parallel products slower than bf16's (BENCHMARKS.md, serving), which is why ``lorakit serve`` decodes on its
    main thread (``Engine.run_here``)."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"--weights {mode!r}: use one of {', '.join(WEIGHT_MODES)}")
    if mode == "precision":
        return "precision", "as asked"
    supported = int8_supported(device)
    if mode == "int8":
        if not supported:
            raise ValueError(
                f"--weights int8: PyTorch's weight-only int8 product does not run on {device}; use --weights precision"
            )
        return "int8", "as asked"
    if precision == "fp32":
        return "precision", "auto: precision fp32 keeps float32 weights and activations"
    if device.type == "cpu" and native_bf16 and supported:
        return "int8", "auto: CPU multiplies bf16 natively, int8 weights read a quarter of float32's bytes"
    if device.type != "cpu":
        return "precision", f"auto: {device.type} runs the precision's own products"
    return "precision", "auto: CPU without native bf16 (int8 weights take bf16 activations, emulated here)"
