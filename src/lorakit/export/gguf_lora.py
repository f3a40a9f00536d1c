"""A lorakit (PEFT-format) adapter as a llama.cpp LoRA adapter GGUF: what ``llama-cli --lora`` and Ollama's
``ADAPTER`` read, over the original, unchanged GGUF base model.

The file (llama.cpp's ``convert_lora_to_gguf.py`` layout): ``general.type = adapter``, ``adapter.type =
lora``, ``adapter.lora.alpha``, ``general.architecture`` of the base, and per adapted weight two tensors
``<GGUF weight name>.lora_a`` (r x d_in) and ``.lora_b`` (d_out x r), named with the ``gguf`` library's own
tensor-name map. llama.cpp scales every pair by ``alpha / r`` with one alpha per file; lorakit folds each
layer's own scaling (``rank_pattern``, ``alpha_pattern``, rsLoRA) into its B, which is exact.

llama.cpp stores the LLaMA family's q and k projections with their rows permuted for its rotary layout
(transformers' GGUF loader undoes it); their B matrices get the same permutation here, A is unchanged.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import LoraConfig
from ..io import PREFIX, read_adapter
from .files import write_gguf

# transformers architecture -> (llama.cpp architecture, q/k rows permuted as llama.cpp's converter does)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
DTYPES = {"f32": np.float32, "f16": np.float16}
_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass
class GgufLoraExport:
    """What was written."""

    path: Path
    architecture: str
    tensors: int  # A/B pairs
    alpha: float
    bytes: int

    def describe(self) -> str:
        return (
            f"wrote {self.path} ({self.bytes / 1e6:.1f} MB): {self.tensors} LoRA weight pairs for llama.cpp "
            f"architecture {self.architecture!r}, alpha {self.alpha:g}"
        )


@dataclass
class GgufLoraFile:
    """A llama.cpp LoRA GGUF ready to be written: the adapter read, checked against the base and converted."""

    architecture: str
    alpha: float
    pairs: int  # A/B pairs
    tensors: list[tuple[str, np.ndarray]]

    def write(self, out: str | os.PathLike) -> GgufLoraExport:
        """Write the file at ``out``, atomically (``out`` is replaced)."""
        out = Path(out)
        _write(out, self.architecture, self.alpha, self.tensors)
        return GgufLoraExport(out, self.architecture, self.pairs, self.alpha, out.stat().st_size)


def export_gguf_lora(
    adapter_dir: str | os.PathLike, base_config, out: str | os.PathLike, *, dtype: str = "f32", overwrite: bool = False
) -> GgufLoraExport:
    """Write the adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF at ``out``, atomically.

    Args:
        base_config: the base model's transformers config (architecture, heads, layer count).
        dtype: ``f32`` or ``f16`` for the A and B tensors.

    Raises:
        ValueError: what ``gguf_lora_file`` refuses, or an existing ``out`` without ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    return gguf_lora_file(adapter_dir, base_config, dtype=dtype).write(out)


def gguf_lora_file(adapter_dir: str | os.PathLike, base_config, *, dtype: str = "f32") -> GgufLoraFile:
    """The adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF's contents, nothing written yet: every refusal
    comes before a file exists.

    Raises:
        ValueError: an architecture llama.cpp names differently and lorakit does not map, an adapter with
            parts a llama.cpp LoRA cannot carry (DoRA, modules_to_save, trained biases, embeddings), an adapter
            that does not fit the base, or a bad dtype.
    """
    import gguf

    arch, permute_qk = _architecture(base_config)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not available for gguf-lora; use one of {', '.join(DTYPES)}")
    config, tensors = read_adapter(adapter_dir)
    pairs = _pairs(config, tensors, adapter_dir)
    _check_fits(pairs, base_config, adapter_dir)
    alpha = float(config.alpha)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], base_config.num_hidden_layers)
    writer_tensors: list[tuple[str, np.ndarray]] = []
    for path, (a, b) in sorted(pairs.items()):
        name = names.get_name(path)
        if name is None:
            raise ValueError(
                f"{path} has no llama.cpp tensor name for architecture {arch!r}; leave it out of the adapter"
            )
        r, layer_alpha = config.rank_and_alpha(path)
        b = b.float() * (config.scaling(r, layer_alpha) * a.shape[0] / alpha)  # llama.cpp applies alpha / r
        if permute_qk:
            b = rotary_rows(b, path, base_config)
        writer_tensors.append((f"{name}.weight.lora_a", a.float().numpy().astype(DTYPES[dtype])))
        writer_tensors.append((f"{name}.weight.lora_b", b.numpy().astype(DTYPES[dtype])))
    return GgufLoraFile(arch, alpha, len(pairs), writer_tensors)


def _architecture(base_config) -> tuple[str, bool]:
    names = list(getattr(base_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ValueError(
        f"gguf-lora export supports the base architectures {', '.join(ARCHITECTURES)}; this base is "
        f"{', '.join(names) or 'of unknown architecture'}. Export a merged model instead, or use another base"
    )


def _pairs(
    config: LoraConfig, tensors: dict[str, torch.Tensor], source
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) per adapted module path; anything else in the adapter is an error naming it."""
    if config.use_dora:
        raise ValueError(
            f"{source} is a DoRA adapter: llama.cpp LoRA files carry plain A and B only. Merge it into the base "
            "(lorakit merge) and convert the merged model, or retrain without use_dora"
        )
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(PREFIX))
        if match is None:
            raise ValueError(
                f"{source} holds {key}, which a llama.cpp LoRA file cannot carry (only lora_A / lora_B of linear "
                "layers: no modules_to_save, trained biases or embedding adapters). Merge it into the base instead"
            )
        found.setdefault(match["path"], {})[match["which"]] = tensor
    incomplete = [p for p, ab in found.items() if len(ab) != 2]
    if incomplete or not found:
        raise ValueError(f"{source}: no complete lora_A / lora_B pair for {incomplete[:3] or 'any module'}")
    return {p: (ab["A"], ab["B"]) for p, ab in found.items()}


def _check_fits(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], base_config, source) -> None:
    """Every pair must fit its layer of the base (built on the meta device: no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config)
    modules = dict(skeleton.named_modules())
    for path, (a, b) in sorted(pairs.items()):
        layer = modules.get(path)
        shape = getattr(getattr(layer, "weight", None), "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"{source} adapts {path}, which this base has no linear layer for: it is for another base")
        if (b.shape[0], a.shape[1]) != tuple(shape):
            raise ValueError(
                f"{source} does not fit this base: {path} is {tuple(shape)} (out, in) here, the adapter's update is "
                f"{(b.shape[0], a.shape[1])}. It was trained on another base; export it with that --model"
            )


def rotary_rows(rows: torch.Tensor, path: str, config) -> torch.Tensor:
    """``rows`` of the module at ``path`` (its weight, or an adapter's B) in llama.cpp's order: permuted for
    the q and k projections (their heads' counts from ``config``), unchanged for every other module."""
    if path.endswith("q_proj"):
        return _rotary_permute(rows, config.num_attention_heads)
    if path.endswith("k_proj"):
        return _rotary_permute(rows, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return rows


def _rotary_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, the two rotary halves interleaved (its converter's permute)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _write(out: Path, arch: str, alpha: float, tensors: list[tuple[str, np.ndarray]]) -> None:
    import gguf

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, array in tensors:
            writer.add_tensor(name, array)

    write_gguf(out, arch, fill)
