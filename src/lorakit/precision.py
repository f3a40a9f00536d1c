"""Precision: which dtypes a run stores and computes in, decided by one policy and, for ``auto``, by the hardware.

===========  ===================  ======================  ==========================  =====================
precision    frozen base stored   trained tensors and     forward / backward          loss scaling
                                  optimizer state
===========  ===================  ======================  ==========================  =====================
fp32         float32              float32                 float32                     -
bf16-mixed   bfloat16             float32                 ``torch.autocast`` bf16     -
bf16         bfloat16             bfloat16                bfloat16                    -
fp16-mixed   float16              float32                 ``torch.autocast`` fp16     GradScaler (CUDA only)
===========  ===================  ======================  ==========================  =====================

``auto`` picks bf16-mixed where the hardware multiplies bf16 natively (a CUDA device with bf16 support; a
CPU with AMX or AVX-512 BF16, where bf16 matrix products run 2.6-7x faster than float32) and fp32 elsewhere
(without those instructions a CPU emulates bf16, slower than float32). ``decide`` says which and why, and is
tested against forced CPU flags and CUDA answers on any machine.

Mixed precision keeps what trains in float32 (an update of lr 2e-4 on entries of ~0.03 is below one bf16 step
and would round away) while the products run in the fast dtype: PEFT's ``autocast_adapter_dtype=True``,
Unsloth's and LLaMA-Factory's convention. This module imports nothing of lorakit's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16", "fp16-mixed")
LOW_PRECISION = (torch.bfloat16, torch.float16)
AUTOCAST_CASTS = (torch.float32, *LOW_PRECISION)  # the dtypes autocast casts for its products (float64 it leaves)
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix instructions


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` is never ``auto``; ``reason`` says why it was chosen."""

    name: str
    storage: torch.dtype  # the frozen base model's weights
    trained: torch.dtype  # adapters, DoRA magnitudes, trained biases, modules_to_save, optimizer state
    autocast: torch.dtype | None  # the dtype of ``torch.autocast`` for forward and backward, or None
    scaled: bool  # a GradScaler scales the loss (fp16-mixed)
    reason: str = ""

    def describe(self) -> str:
        return f"precision: {self.name}" + (f" ({self.reason})" if self.reason else "")

    def context(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """The forward's autocast context on ``device`` (a no-op without autocast)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast)


def _fixed(name: str, reason: str = "") -> Precision:
    table = {
        "fp32": (torch.float32, torch.float32, None, False),
        "bf16-mixed": (torch.bfloat16, torch.float32, torch.bfloat16, False),
        "bf16": (torch.bfloat16, torch.bfloat16, None, False),
        "fp16-mixed": (torch.float16, torch.float32, torch.float16, True),
    }
    storage, trained, autocast, scaled = table[name]
    return Precision(name, storage, trained, autocast, scaled, reason)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo (empty off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device | str, *, flags: frozenset[str] | None = None, cuda_bf16: bool | None = None):
    """(whether ``device`` multiplies bf16 natively, the reason in words). ``flags`` and ``cuda_bf16`` stand in
    for the machine's answers (tests force both)."""
    device = torch.device(device)
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        return supported, "the GPU supports bf16" if supported else "the GPU has no bf16 support"
    if device.type != "cpu":
        return False, f"{device.type} devices are not measured for bf16"
    flags = cpu_flags() if flags is None else flags
    found = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if found:
        return True, f"CPU has {' and '.join(f.replace('_bf16', '').upper() for f in found)} bf16 instructions"
    return False, "CPU has no AMX or AVX-512 BF16: bf16 would be emulated, slower than float32"


def decide(
    name: str, device: torch.device | str, *, flags: frozenset[str] | None = None, cuda_bf16: bool | None = None
) -> Precision:
    """The precision ``name`` resolves to on ``device``: ``auto`` by the hardware, the others as named (checked
    against the device). Raises ValueError naming the fix for an unknown name or a precision the device lacks."""
    if name not in PRECISIONS:
        raise ValueError(f"precision={name!r}: use one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if name == "auto":
        native, why = native_bf16(device, flags=flags, cuda_bf16=cuda_bf16)
        return _fixed("bf16-mixed" if native else "fp32", f"auto: {why}")
    if name == "fp16-mixed" and device.type != "cuda":
        raise ValueError(
            "precision=fp16-mixed needs a CUDA device: float16 with loss scaling is a GPU convention, and a CPU "
            "has no fast float16 products; use precision=bf16-mixed (or auto) on a CPU"
        )
    if name in ("bf16-mixed", "bf16") and device.type == "cuda":
        native, why = native_bf16(device, cuda_bf16=cuda_bf16)
        if not native:
            raise ValueError(f"precision={name}: {why}; use precision=fp16-mixed or fp32 on this GPU")
    return _fixed(name)


# ----- what the fast paths compute in -----------------------------------------------------------------------
def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on ``device_type`` right now, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def fast_path_dtype(x: torch.Tensor, *tensors: torch.Tensor | None) -> torch.dtype | None:
    """The one dtype a fused function computes ``x`` and ``tensors`` in: under autocast, autocast's dtype
    (floating inputs are cast to it, as autocast casts them for the reference maths); otherwise their common
    dtype. None where the reference maths must decide: mixed dtypes outside autocast, or a float64 tensor under
    autocast (which autocast leaves in float64)."""
    present = [t for t in (x, *tensors) if t is not None]
    dtype = autocast_dtype(x.device.type)
    if dtype is not None and x.is_floating_point():
        return None if any(t.dtype not in AUTOCAST_CASTS for t in present if t.is_floating_point()) else dtype
    dtypes = {t.dtype for t in present}
    return dtypes.pop() if len(dtypes) == 1 else None


@contextlib.contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """A block whose inputs were already cast by the caller: autocast off (as ``torch.amp.custom_fwd`` does)."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


def cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in ``dtype`` (a differentiable cast: a float32 parameter gets its gradient in float32)."""
    if tensor is None or tensor.dtype == dtype or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)
