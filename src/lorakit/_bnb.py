"""The one place that knows bitsandbytes' quantized layers and their weight layouts.

Everything else in lorakit asks this module whether a layer is quantized, what float weight it multiplies
by, and how to keep it trainable; nothing else reads bitsandbytes' internals. It imports bitsandbytes only
inside functions that need it, so lorakit works without it.

bitsandbytes stores a 4-bit weight in one of two layouts on the CPU:

- plain: the weight's 4-bit codes in row-major order, two per byte, with one absmax scale per block of
  ``blocksize`` consecutive weights (nf4 also quantizes those scales to 8 bits, "double quantization");
- packed for CPU: on processors with AVX-512 BF16 (Intel Xeon with AMX, say), ``Linear4bit.forward`` in
  eval mode without gradients rewrites the weight in place into a tiled layout for its bfloat16 kernel,
  with the scales as a (in_features / blocksize, out_features) bfloat16 table
  (``quant_state.packing_format_for_cpu``).

``bitsandbytes.functional.dequantize_4bit`` reads only the plain layout, and the packed kernel has no
autograd formula, so a layer packed by one evaluation would stop passing gradients to the layers below it
once training resumes. The repacking also fails outright when in_features is not a multiple of the block
size. lorakit therefore keeps the layers it trains on the plain layout (``keep_plain_layout``) and reads a
packed weight explicitly (``dequantized_weight``) when it meets one, in a model quantized elsewhere.

On a processor with AVX-512 BF16, importing bitsandbytes also tries to fetch a faster kernel for that packed
layout from the Hugging Face Hub (``kernels-community/quantization-bitsandbytes``) and, when that fails (no
``kernels`` package, no network, or an untrusted publisher), logs "Failed to load CPU gemm_4bit_forward from
kernels-community ... trust_remote_code". The message is never useful to a lorakit user: the layers lorakit
quantizes or trains stay on the plain layout, which never calls that kernel, and even the packed layout falls
back to bitsandbytes' own compiled kernel. So ``require_bitsandbytes`` drops that one record while it imports
bitsandbytes (``kernels_hub_message_dropped``: a filter on bitsandbytes' logger, removed again at once, so a
program's logging is left as it was), and the command line drops it for as long as a command runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

QUANT_METHODS = ("nf4", "fp4", "int8")
_QUANTIZED_TYPES = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")
_PACK_BLOCK_N = 32  # rows per tile of the packed layout (bitsandbytes' block_n)
_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_INT8_FLOAT_DTYPE = "lorakit_float_dtype"  # set on an int8 layer by ``quantize``: see ``set_int8_float_dtype``


def require_bitsandbytes(method: str = "nf4"):
    """The bitsandbytes module, or a ValueError saying how to install it."""
    try:
        with kernels_hub_message_dropped():
            import bitsandbytes
    except ImportError as err:
        raise ValueError(
            f"quantize={method!r} needs bitsandbytes, which is not installed ({err}). Install it with "
            "pip install 'bitsandbytes>=0.50' (CPU and CUDA), or pip install 'lorakit[quant]'"
        ) from None
    return bitsandbytes


@contextmanager
def kernels_hub_message_dropped() -> Iterator[None]:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" record meanwhile.

    Only that record of that logger; see the module docstring for why it never matters to a lorakit user.
    """
    logger = logging.getLogger(_KERNELS_LOGGER)
    dropped = _KernelsHubMessage()
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)


class _KernelsHubMessage(logging.Filter):
    """Rejects the record bitsandbytes logs when its CPU kernel from the Hub cannot be loaded."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_KERNELS_MESSAGE)


def check_method(method: str) -> None:
    if method not in QUANT_METHODS:
        raise ValueError(f"quantize={method!r} is not supported; use one of {', '.join(QUANT_METHODS)} (or none)")


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (checked without importing bitsandbytes)."""
    return type(module).__name__ in _QUANTIZED_TYPES


def quant_method(module: nn.Module) -> str | None:
    """``nf4``, ``fp4`` or ``int8`` for a quantized layer, None otherwise."""
    if not is_quantized(module):
        return None
    if type(module).__name__ == "Linear8bitLt":
        return "int8"
    return getattr(module.weight, "quant_type", "nf4")


def is_cpu_packed(layer: nn.Module) -> bool:
    """Whether a 4-bit layer's weight is in bitsandbytes' packed CPU layout (see the module docstring)."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_plain_layout(layer: nn.Module) -> None:
    """Put a 4-bit layer back on the plain layout and stop bitsandbytes from repacking it.

    Called by ``quantize`` for each layer it makes and by ``inject`` for every 4-bit layer of the model, wrapped
    or not (gradients must pass through all of them). ``support_avx512bf16_for_cpu`` is the
    attribute ``Linear4bit.forward`` reads to decide on repacking. A weight already packed is rewritten in
    the plain layout by hand: bitsandbytes 0.50's own inverse (``_convert_weight_packed_for_cpu_inverse``)
    is private, re-quantizes nf4's scales, and leaves unquantized scales in the packed table's transposed
    order. Here the scales stay the float values the packed kernel used, so the layer multiplies by exactly
    the weight it had while packed.
    """
    if not is_quantized(layer) or quant_method(layer) == "int8":
        return
    layer.support_avx512bf16_for_cpu = False
    if not is_cpu_packed(layer):
        return
    weight, state = layer.weight, layer.weight.quant_state
    codes = _packed_codes(weight.data, state).reshape(-1)
    data = ((codes[0::2] << 4) | codes[1::2]).reshape(state.original_qshape)
    storage = getattr(state, "original_storage_type", None)
    weight.data = data.view(storage) if storage is not None else data
    state.absmax = state.absmax.float().T.reshape(-1).contiguous()
    state.nested, state.offset, state.state2 = False, None, None
    state.dtype = state.original_dtype
    state.packing_format_for_cpu = False
    layer.quant_state = state


def dequantized_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (d_out, d_in) that a quantized layer multiplies by, in either 4-bit layout."""
    import bitsandbytes.functional as bf

    weight = layer.weight
    if type(layer).__name__ == "Linear8bitLt":
        return bf.int8_vectorwise_dequant(weight.data, weight.SCB).to(dtype).view(layer.out_features, -1)
    if is_cpu_packed(layer):
        return _dequantize_packed(weight.data, weight.quant_state).to(dtype)
    return bf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


def _dequantize_packed(packed: torch.Tensor, state) -> torch.Tensor:
    """The float weight of the packed CPU layout, read by hand: ``dequantize_4bit`` reads only the plain one."""
    codes = _packed_codes(packed, state)
    scales = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)  # (N, K)
    return state.code.float()[codes.long()] * scales


def _packed_codes(packed: torch.Tensor, state) -> torch.Tensor:
    """The (N, K) 4-bit codes of bitsandbytes' packed CPU layout (``_convert_weight_packed_for_cpu``).

    The codes are cut into tiles of 32 rows; each tile's 64 codes for one pair of columns (row by row, the
    pair's two codes side by side) are stored in 32 bytes, the first 32 codes in the low nibbles and the last
    32 in the high ones. The scales are a (K / blocksize, N) bfloat16 table.
    """
    n, k = state.shape
    groups = packed.view(torch.uint8).reshape(-1, _PACK_BLOCK_N)
    codes = torch.cat([groups & 0xF, groups >> 4], dim=-1)  # (N/32 * K/2, 64)
    return codes.reshape(n // _PACK_BLOCK_N, k // 2, _PACK_BLOCK_N, 2).transpose(1, 2).reshape(n, k)


def float_dtype(layer: nn.Module) -> torch.dtype:
    """The float dtype a layer computes in: its weight's, or for a quantized layer its compute dtype (a 4-bit
    layer's ``compute_dtype``; for an int8 layer the one ``quantize`` recorded), else float32. The adapter dtype
    policy reads it: float32 adapters over a bf16 compute dtype by default."""
    weight = layer.weight
    if weight.dtype.is_floating_point:
        return weight.dtype
    for attr in ("compute_dtype", _INT8_FLOAT_DTYPE):
        compute = getattr(layer, attr, None)
        if isinstance(compute, torch.dtype):
            return compute
    return torch.float32


def set_int8_float_dtype(layer: nn.Module, dtype: torch.dtype) -> None:
    """Record the float dtype an int8 layer's inputs, outputs and bias are in: bitsandbytes' ``Linear8bitLt`` has
    no compute dtype (it multiplies in its input's dtype), yet ``float_dtype`` must answer for it (the adapter
    dtype and the dequantized weight's dtype follow it): bf16 for a base quantized under bf16-mixed."""
    setattr(layer, _INT8_FLOAT_DTYPE, dtype)
