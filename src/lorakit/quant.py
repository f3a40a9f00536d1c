"""QLoRA's quantized base: the frozen linear weights stored in 4 bits (nf4, fp4) or 8 bits (int8) with
bitsandbytes, LoRA kept in full precision beside them.

``quantize(model, "nf4")`` replaces every ``nn.Linear`` of the base model except the output head with a
bitsandbytes ``Linear4bit`` (or ``Linear8bitLt`` for int8), quantizing the weights in place, and reports the
memory of those weights before and after. Add adapters afterwards with ``inject`` as usual.

The compute dtype: what a quantized layer dequantizes its weight to and multiplies in (``compute_dtype``, by
default the model's float dtype). Under a mixed precision (``lorakit.precision``) it is the precision's storage
dtype, bfloat16 for bf16-mixed: the 4-bit products then run in bf16 as autocast runs the rest of the model, and
the adapters over them are float32 by ``inject``'s default over a low-precision base (``adapter_dtype="base"``
keeps them in the compute dtype, as precision bf16 does). ``_bnb.float_dtype`` reports the compute dtype, also
for int8 layers, whose bitsandbytes class has none of its own (it computes in its input's dtype).

A quantized weight cannot take a merge without being rounded again, so ``merge`` refuses it. The choice
lorakit makes instead (``lorakit merge --quantize``, or ``dequantize`` then ``merge`` here): dequantize the base,
merge in float, keep the result in float. ``requantization_drift`` measures what re-quantizing that merged
model would cost, so the number is on the table rather than silently accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._bnb import (
    QUANT_METHODS,
    check_method,
    dequantized_weight,
    is_quantized,
    keep_plain_layout,
    quant_method,
    require_bitsandbytes,
    set_int8_float_dtype,
)
from .fastpath import trim_freed_memory
from .models import load_model, resolve_model_dir
from .state import has_adapters, set_submodule
from .targeting import output_heads

__all__ = [
    "QUANT_METHODS",
    "QuantizeReport",
    "dequantize",
    "dequantized_weight",
    "is_quantized",
    "load_quantized",
    "quant_method",
    "quantize",
    "quantized_bytes",
    "requantization_drift",
]


@dataclass
class QuantizeReport:
    method: str
    layers: int
    bytes_before: int  # the linear weights in the dtype they had
    bytes_after: int  # quantized weights plus their scales and codebooks

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    def describe(self) -> str:
        return (
            f"quantized {self.layers} linear layers to {self.method}: weights {self.bytes_before / 1e6:.1f} MB -> "
            f"{self.bytes_after / 1e6:.1f} MB ({self.ratio:.2f}x smaller)"
        )


def quantize(model: nn.Module, method: str = "nf4", compute_dtype: torch.dtype | None = None) -> QuantizeReport:
    """Quantize the base model's linear layers (not the output head) in place.

    Args:
        method: ``nf4`` (QLoRA's NormalFloat4, double-quantized scales), ``fp4`` or ``int8`` (LLM.int8 rows).
        compute_dtype: the float dtype the quantized layers take inputs in, multiply in (4-bit) and keep their
            bias in; default: each layer's own weight dtype (the model's). With a precision, pass its storage
            dtype: ``quantize(model, method, compute_dtype=precision.storage)`` (bf16 for bf16-mixed).

    Raises:
        ValueError: unknown method or compute dtype, bitsandbytes missing, the model already has adapters, or
            nothing to quantize.
    """
    check_method(method)
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise ValueError(f"compute_dtype={compute_dtype!r}: use a float dtype such as torch.bfloat16, or None")
    bnb = require_bitsandbytes(method)
    if has_adapters(model):
        raise ValueError("quantize the base model before adding adapters: call quantize() first, then inject()")
    heads = output_heads(model)
    targets = [(p, m) for p, m in model.named_modules() if type(m) is nn.Linear and p not in heads]
    if not targets:
        raise ValueError("the model has no nn.Linear layers (other than its output head) to quantize")
    before = after = 0
    count = len(targets)
    for path, linear in targets:
        weight = linear.weight
        before += weight.numel() * weight.element_size()
        dtype = compute_dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
        layer = _quantized_layer(bnb, method, linear, weight.detach(), dtype, weight.device)
        after += quantized_bytes(layer)
        set_submodule(model, path, layer)
    del targets, linear, weight  # the float weights die here
    _own_cpu_tensors(model)
    return QuantizeReport(method, count, before, after)


def _quantized_layer(
    bnb, method: str, linear: nn.Module, weight: torch.Tensor, dtype: torch.dtype, device
) -> nn.Module:
    """The bitsandbytes layer for ``linear`` holding ``weight`` quantized to ``method``, computing in ``dtype`` on
    ``device`` (bitsandbytes quantizes on the move there); ``linear``'s bias is taken over."""
    if method == "int8":
        layer = bnb.nn.Linear8bitLt(  # on the meta device: no float weight to initialise, only to replace
            linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        set_int8_float_dtype(layer, dtype)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=dtype,
            compress_statistics=method == "nf4",
            quant_type=method,
            device="meta",  # no float weight to initialise (kaiming on a 7B model: ~25 s), only to replace
        )
        layer.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type=method, module=layer)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=linear.bias.requires_grad)
    layer = layer.to(device)  # bitsandbytes quantizes on this move
    keep_plain_layout(layer)  # the same layout and numbers on every CPU; see lorakit._bnb
    layer.weight.requires_grad_(False)
    layer.train(linear.training)
    return layer


@torch.no_grad()
def _own_cpu_tensors(model: nn.Module) -> None:
    """Copy the float parameters and buffers left on the CPU into memory of their own.

    transformers maps the checkpoint file and its tensors are views of that one mapping: while any of them
    (the embeddings, the norms) lives, the whole file stays mapped, and the pages quantization read (every
    float linear weight, now dead) stay counted in the process's memory. Measured on SmolLM2-135M: 0.91 GB
    resident after quantizing to nf4 without this copy, 0.60 GB with it.
    """
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param.device.type == "cpu" and param.dtype.is_floating_point:
                param.data = param.data.clone()
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type == "cpu":
                module._buffers[name] = buffer.clone()


def quantized_bytes(layer: nn.Module) -> int:
    """Memory of a quantized layer's weight: the packed data plus every tensor of its quantization state."""
    weight = layer.weight
    total = weight.data.numel() * weight.data.element_size()
    if type(layer).__name__ == "Linear8bitLt":
        scb = getattr(weight, "SCB", None)
        return total + (scb.numel() * scb.element_size() if scb is not None else 0)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        for value in state.as_dict(packed=True).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every quantized linear layer (also those under LoRA wrappers) by an ``nn.Linear`` holding its
    dequantized weight in ``dtype``; returns how many layers changed."""
    count = 0
    for path, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear = linear.to(device=module.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(dequantized_weight(module, dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias.to(dtype))
        linear.requires_grad_(False)
        linear.train(module.training)
        set_submodule(model, path, linear)
        count += 1
    return count


@torch.no_grad()
def requantization_drift(merged: nn.Module, method: str, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """How much re-quantizing a merged float model to ``method`` would move its logits on ``inputs``.

    Quantizes a copy (the model given is left alone) and returns the largest and mean absolute logit change and
    the share of positions whose top-1 token changes.
    """
    import copy

    check_method(method)
    copy_ = copy.deepcopy(merged)
    quantize(copy_, method)
    reference = merged(**inputs).logits.float()
    requantized = copy_(**inputs).logits.float()
    diff = (requantized - reference).abs()
    flipped = (requantized.argmax(-1) != reference.argmax(-1)).float().mean()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "top1_changed": float(flipped)}


# ----- loading quantized ---------------------------------------------------------------------------------------
_FILE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class _NotDirect(Exception):
    """The files' tensor names do not map one to one onto the model's (load whole, then quantize)."""


def load_quantized(
    spec,
    method: str = "nf4",
    *,
    task: str = "causal-lm",
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    attention: str | None = None,
    log=None,
) -> tuple[nn.Module, object, QuantizeReport]:
    """Load (model, tokenizer, report) for ``spec`` with its linear layers (not the output head) quantized while
    loading: the model is built on the meta device, and the safetensors files are read one tensor at a time with
    plain reads (no memory mapping, so the pages read are not counted in this process's memory). Each linear
    weight is quantized on the CPU as it arrives and only its packed form moves to ``device``; the other
    tensors are stored in ``dtype`` on ``device``. No float copy of the model is ever whole, so the peak memory is
    the quantized model plus one layer's weight in ``compute_dtype`` (float32 when unset and ``dtype`` is).

    The same layers and numbers as ``load_model`` then ``quantize(model, method, compute_dtype)``. Where the
    files' names do not map one to one onto the model's parameters (a checkpoint transformers renames while
    loading, pickled weights, a head the files lack), it does exactly that instead, and says so through ``log``.
    """
    check_method(method)
    bnb = require_bitsandbytes(method)
    compute = compute_dtype or dtype
    model, tokenizer = load_model(spec, task, dtype, skeleton=True, attention=attention)
    try:
        report = _fill_quantized(model, resolve_model_dir(spec), bnb, method, dtype, compute, torch.device(device))
    except _NotDirect as why:
        if log is not None:
            log(f"quantizing after a full load ({why})")
        model, tokenizer = load_model(spec, task, dtype, attention=attention)
        model.to(device)
        report = quantize(model, method, compute_dtype=compute)
    model.eval()
    return model, tokenizer, report


def _fill_quantized(model, directory: Path, bnb, method, dtype, compute, device) -> QuantizeReport:
    index = _safetensors_index(directory)
    state = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "")
    names = {key: _model_name(key, state, prefix) for key in index}
    unknown = sorted(k for k, n in names.items() if n is None)
    if unknown:
        raise _NotDirect(f"{len(unknown)} tensors of the files are not the model's parameters, e.g. {unknown[0]}")
    heads = output_heads(model)
    linears = {f"{p}.weight": p for p, m in model.named_modules() if type(m) is nn.Linear and p not in heads}
    # the plain tensors first (biases included, which the quantized layers take over), then the linear weights
    order = sorted(index, key=lambda k: names[k] in linears)
    before = after = count = 0
    with torch.no_grad():
        for key in order:
            file, entry = index[key]
            tensor = _read_tensor(file, entry)
            name = names[key]
            if name not in linears:
                _set_tensor(model, name, state[name], tensor, dtype, device)
                continue
            tensor = tensor.to(dtype)  # as load_model would hold it, so the numbers are quantize()'s
            before += tensor.numel() * tensor.element_size()
            path = linears[name]
            linear = model.get_submodule(path)
            if tuple(tensor.shape) != (linear.out_features, linear.in_features):
                raise ValueError(
                    f"{file}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(linear.weight.shape)}"
                )
            # quantized on the CPU: a float weight never reaches another device
            layer = _quantized_layer(bnb, method, linear, tensor, compute, "cpu")
            del tensor
            # quantizing frees a few hundred MB of temporaries a layer, and glibc keeps such freed blocks in its
            # heap (a 1B model: 3.3 GB resident at the end without this, 1.4 GB with it)
            trim_freed_memory()
            if device.type != "cpu":
                layer = layer.to(device)
            after += quantized_bytes(layer)
            count += 1
            set_submodule(model, path, layer)
    model.tie_weights()
    for module in model.modules():  # the buffers the files do not hold (rotary frequencies) are the skeleton's
        for key, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta and buffer.device != device:
                module._buffers[key] = buffer.to(device)
    missing = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise _NotDirect(f"the files lack {len(missing)} of the model's tensors, e.g. {missing[0]}")
    if not count:
        raise ValueError("the model has no nn.Linear layers (other than its output head) to quantize")
    return QuantizeReport(method, count, before, after)


def _model_name(key: str, state: dict, prefix: str) -> str | None:
    """The model's name for the files' tensor ``key`` (with or without the base model's prefix), or None."""
    for name in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
        if name in state:
            return name
    return None


def _set_tensor(model: nn.Module, name: str, old: torch.Tensor, tensor: torch.Tensor, dtype, device) -> None:
    """Put ``tensor`` (float ones in ``dtype``) on ``device`` where the model's parameter or buffer ``name`` is."""
    if tuple(tensor.shape) != tuple(old.shape):
        raise ValueError(f"{name}: the files hold shape {tuple(tensor.shape)}, the model expects {tuple(old.shape)}")
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def _safetensors_index(directory: Path) -> dict[str, tuple[Path, tuple]]:
    """Where each tensor of the model's safetensors files lies: key -> (file, (dtype, shape, start, end))."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise _NotDirect(f"{directory} has no safetensors files")
    index: dict[str, tuple[Path, tuple]] = {}
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if not 2 <= length <= min(size - 8, 100 << 20):
                raise ValueError(
                    f"{file} is not a readable safetensors file (header length {length}); download it again"
                )
            try:
                header = json.loads(fh.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{file} is not a readable safetensors file ({err}); download it again") from None
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _FILE_DTYPES.get(info.get("dtype"))
            start, end = (8 + length + int(o) for o in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            if dtype is None or end > size or end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{file}: tensor {key} ({info.get('dtype')}, {list(shape)}) does not fit the file")
            index[key] = (file, (dtype, shape, start, end))
    return index


def _read_tensor(file: Path, entry: tuple) -> torch.Tensor:
    """One tensor, read into memory of its own with plain reads."""
    dtype, shape, start, end = entry
    buffer = bytearray(end - start)
    view = memoryview(buffer)
    with open(file, "rb", buffering=0) as fh:
        fh.seek(start)
        done = 0
        while done < len(buffer):
            got = fh.readinto(view[done:])
            if not got:
                raise ValueError(f"{file} ends early: it is truncated; download it again")
            done += got
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)
