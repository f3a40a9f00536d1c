"""Faster CPU kernels for linear layers: oneDNN for many-row float32 products, a transposed layout for few rows.

Many rows (training, prefill): PyTorch sends a float32 ``F.linear`` to MKL's sgemm. On AMD x86-64 CPUs,
oneDNN's matmul (also inside every PyTorch CPU build) does most forward products of a training step faster:
on the 2-core AVX2 EPYC of BENCHMARKS.md, the 49152-entry output head on 512 rows by 16-19 % (411 against
499 ms), the projections by -4 to +13 % depending on shape and load (``bench/gemm_backends.py``). ``linear`` takes
that path for float32 CPU tensors outside autograd (LoRA's fused functions, the fused loss, inference);
results agree with MKL's to float32 rounding. Input-gradient products stay on MKL, which is faster there.
``LORAKIT_CPU_GEMM`` chooses: ``auto`` (the default: oneDNN on AMD x86-64, where it was measured faster; MKL
elsewhere), ``onednn`` or ``blas``.

Few rows (decoding): on CPU, BLAS handles ``x @ W.T`` poorly when x has few rows (a decode step of a
small batch): the same product computed as ``(W @ x.T).T`` runs 1.3-3x faster (measured on the 2-core AVX2 machine in
BENCHMARKS.md: the 49152 x 576 output head with 8 rows, 47.6 ms against 16.0 ms; a 1536 x 576 layer,
0.52 ms against 0.35 ms). The results agree to float rounding. ``lorakit.patches.enable_skinny_linear``
gives every ``nn.Linear`` of a model that path for 2..32 rows on CPU without gradients, and the usual one
otherwise (the serving engine does, by default on CPU).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 32  # beyond this the ordinary layout is as fast (measured ratio -> 0.9 at 64 rows)


GEMM_CHOICES = ("auto", "onednn", "blas")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty off Linux)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                found[key.strip()] = value.strip()
    except OSError:
        pass
    return found


def _cpu_vendor() -> str:
    return _cpuinfo().get("vendor_id", "")


def cpu_description() -> str:
    """The CPU model and the vector extensions that change library code paths, for benchmark headers:
    for example ``AMD EPYC (x86_64, AVX2)`` or ``Intel(R) Xeon(R) Platinum 8480+ (x86_64, AVX-512 BF16, AMX)``."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    features = [
        name
        for flag, name in (
            ("avx2", "AVX2"),
            ("avx512f", "AVX-512"),
            ("avx512_bf16", "AVX-512 BF16"),
            ("amx_tile", "AMX"),
        )
        if flag in flags
    ]
    model = info.get("model name") or platform.processor() or "unknown CPU"
    return f"{model} ({', '.join([platform.machine(), *features])}), {os.cpu_count()} cores"


@functools.cache
def onednn_enabled() -> bool:
    """Whether ``linear`` sends many-row float32 CPU products to oneDNN (see the module docstring)."""
    choice = os.environ.get("LORAKIT_CPU_GEMM", "auto").strip().lower() or "auto"
    if choice not in GEMM_CHOICES:
        raise ValueError(f"LORAKIT_CPU_GEMM={choice!r} is not one of {', '.join(GEMM_CHOICES)}; unset it for auto")
    if choice == "blas" or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 - present in x86 builds with oneDNN
    except (AttributeError, RuntimeError):
        return False
    if choice == "onednn":
        return True
    return platform.machine().lower() in ("x86_64", "amd64") and _cpu_vendor() == "AuthenticAMD"


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``linear(x, weight, bias)`` runs on oneDNN."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() >= 2
        and x.numel() > MAX_ROWS * x.shape[-1]
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.is_contiguous()
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or _requires_grad(bias)))
        and onednn_enabled()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; many-row float32 CPU products outside autograd go to oneDNN when enabled."""
    if uses_onednn(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _requires_grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad


def skinny_matmul(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x2d @ weight.T`` for an (n, d_in) ``x2d`` and (d_out, d_in) ``weight``, fast for few rows on CPU."""
    if 1 < x2d.shape[0] <= MAX_ROWS and x2d.device.type == "cpu":
        return (weight @ x2d.T).T
    return x2d @ weight.T


def skinny_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear``'s forward with the few-rows CPU layout without gradients (``lorakit.patches`` installs it)."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if not (1 < rows <= MAX_ROWS and x.device.type == "cpu") or torch.is_grad_enabled():
        return linear(x, self.weight, self.bias)
    out = (self.weight @ x.reshape(rows, x.shape[-1]).T).T
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes or more with their own memory mappings (glibc only).

    glibc's default raises its mmap threshold as large blocks are freed, after which activations are carved
    from the heap and their memory stays with the process once freed: a training step's peak RSS then sits
    above the tensors alive at any moment. With a fixed threshold, freed activations go back to the OS at
    once; the price is a page fault on every fresh block (measured on SmolLM2-135M, batch 8 x 128, LoRA on
    2 CPU cores: peak RSS 2.64 against 3.0 GB, step 11.8 against 10.5 s). The trainer sets it when
    ``train.lean_cpu_memory`` is true, and by default with gradient checkpointing or a quantized base.
    Returns whether the setting took effect (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(_libc().mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


_M_MMAP_THRESHOLD = -3


def trim_freed_memory() -> bool:
    """Give the free pages inside the allocator's heaps back to the OS (glibc's ``malloc_trim``; False off glibc).

    A long-running process whose tensors change shape from step to step (a server's batch and KV cache) leaves
    free holes between live blocks that glibc keeps; RSS then creeps up after its working set has stopped
    growing. Trimming every few seconds returns those pages. Returns whether the call was made (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")
