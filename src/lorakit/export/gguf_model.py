"""An adapter merged into its base and written as one standalone GGUF model (``lorakit export --format gguf``).

The weights are the merged float model's (``lorakit.unload(model, merge=True)``), named and laid out as
llama.cpp's converter writes them (the ``gguf`` library's tensor-name map; the LLaMA family's q / k rows
permuted for llama.cpp's rotary layout). Everything else, the tokenizer (tokens, merges, pre-tokenizer), the
chat template, the BOS / EOS / end-of-turn ids and the architecture's hyperparameters, is copied from the base
model's own GGUF, which llama.cpp already reads correctly, so a chat with the merged file is rendered and
stopped exactly as with the base. The tensor set and every shape must equal the base GGUF's: an adapter
merged into another base is refused before anything is written.

Types: ``f32``, ``f16``, ``bf16``, and the block types the ``gguf`` library can write: ``q8_0``, ``q5_1``,
``q5_0``, ``q4_1``, ``q4_0``. Norms and other 1-D tensors stay f32 (as llama.cpp's converter keeps them); a
2-D tensor whose rows do not divide into the block size is written f16 and listed in the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .files import write_gguf
from .gguf_lora import _architecture, rotary_rows

# --dtype -> (GGML tensor type, llama.cpp file type name)
TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# Keys the writer sets itself or that describe the old tensors, never copied from the base.
_OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.type")


@dataclass
class GgufModelExport:
    """What was written."""

    path: Path
    architecture: str
    dtype: str
    tensors: int
    bytes: int
    metadata_from: Path  # the base GGUF the tokenizer, chat template and hyperparameters came from
    f16_fallback: list[str] = field(default_factory=list)  # 2-D tensors whose rows the block size does not divide
    chat_template: bool = False
    eos: str = ""

    def describe(self) -> str:
        text = (
            f"wrote {self.path} ({self.bytes / 1e6:.1f} MB): the merged model, {self.tensors} tensors in {self.dtype} "
            f"for llama.cpp architecture {self.architecture!r}; tokenizer"
            f"{', chat template' if self.chat_template else ''} and end of turn {self.eos} from {self.metadata_from.name}"
        )
        if self.f16_fallback:
            text += f"; {len(self.f16_fallback)} tensors in f16 (rows not a multiple of the block size)"
        return text


def export_gguf_model(
    merged: torch.nn.Module,
    base_gguf: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "f16",
    name_suffix: str = "lorakit merged",
    overwrite: bool = False,
) -> GgufModelExport:
    """Write ``merged`` (a plain transformers causal LM, adapter already merged) as a GGUF at ``out``,
    atomically, with the metadata of ``base_gguf`` (the same base, as llama.cpp's converter wrote it).

    Raises:
        ValueError: a bad dtype, an architecture outside ``gguf_lora.ARCHITECTURES``, a model whose tensors or
            shapes differ from the base GGUF's, or an existing ``out`` without ``overwrite``.
    """
    import gguf

    out, base_gguf = Path(out), Path(base_gguf)
    if dtype not in TYPES:
        raise ValueError(f"--dtype {dtype!r} is not available for gguf; use one of {', '.join(TYPES)}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    arch, permute_qk = _architecture(merged.config)
    reader = gguf.GGUFReader(str(base_gguf))
    base_arch = reader.fields["general.architecture"].contents()
    if base_arch != arch:
        raise ValueError(f"--base-gguf {base_gguf} is a {base_arch!r} model, not {arch!r}: pass the GGUF of this base")
    tensors = _gguf_tensors(merged, arch, permute_qk)
    _check_same_tensors(tensors, reader, base_gguf)
    qtype = gguf.GGMLQuantizationType[TYPES[dtype][0]]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    written: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]] = []
    fallback = []
    for gguf_name, array in tensors.items():
        if array.ndim < 2:
            kind = gguf.GGMLQuantizationType.F32
        elif array.shape[-1] % block:
            kind = gguf.GGMLQuantizationType.F16
            fallback.append(gguf_name)
        else:
            kind = qtype
        written.append((gguf_name, array, kind))
    for base_tensor in reader.tensors:  # tensors the converter computes rather than reads (llama 3 rope_freqs)
        if base_tensor.name not in tensors:
            written.append((base_tensor.name, np.array(base_tensor.data), base_tensor.tensor_type))
    file_type = gguf.LlamaFileType[TYPES[dtype][1]]
    _write(out, arch, reader, written, file_type, name_suffix)
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos = f"{tokens[eos_id]!r} (id {eos_id})" if eos_id is not None and tokens else "(none in the base)"
    return GgufModelExport(
        out, arch, dtype, len(written), out.stat().st_size, base_gguf, fallback,
        chat_template="tokenizer.chat_template" in reader.fields, eos=eos,
    )  # fmt: skip


def _gguf_tensors(model: torch.nn.Module, arch: str, permute_qk: bool) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, float32, q / k rows permuted where llama.cpp wants it."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    result: dict[str, np.ndarray] = {}
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the embedding for a tied head
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"the merged model's {key} has no llama.cpp tensor name for architecture {arch!r}")
        tensor = tensor.detach().float()
        if permute_qk and key.endswith(".weight"):
            tensor = rotary_rows(tensor, key.removesuffix(".weight"), config)
        result[name] = tensor.numpy()
    return result


def _check_same_tensors(tensors: dict[str, np.ndarray], reader, base_gguf: Path) -> None:
    """The merged model must be the base the GGUF holds: same tensor names, same shapes."""
    base = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    missing = sorted(set(tensors) - set(base))
    wrong = [(n, a.shape, base[n]) for n, a in tensors.items() if n in base and tuple(a.shape) != base[n]]
    if missing or wrong:
        detail = (
            f"{missing[:3]} are not in it" if missing else f"{wrong[0][0]} is {wrong[0][1]} here, {wrong[0][2]} there"
        )
        raise ValueError(
            f"the merged model does not match the base GGUF {base_gguf} ({detail}): the adapter or --model belongs "
            "to another base; pass the GGUF of the model the adapter was trained on with --base-gguf"
        )
    absent = sorted(n for n in set(base) - set(tensors) if not n.startswith("rope_"))
    if absent:
        raise ValueError(
            f"the base GGUF {base_gguf} holds {absent[:3]}, which the merged model lacks: it is another model; "
            "pass the GGUF of the model the adapter was trained on with --base-gguf"
        )


def _field(reader, key: str):
    found = reader.fields.get(key)
    return None if found is None else found.contents()


def _write(out: Path, arch: str, reader, tensors, file_type, name_suffix: str) -> None:
    import gguf

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        for key, found in reader.fields.items():
            if key.startswith("GGUF.") or key in _OWN_KEYS:
                continue
            value = found.contents()
            if key == gguf.Keys.General.NAME:
                value = f"{value} ({name_suffix})"
            sub_type = found.types[-1] if found.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, found.types[0], sub_type=sub_type)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, array, kind in tensors:
            if array.dtype == np.uint8:  # already in its block layout (copied from the base)
                writer.add_tensor(name, array, raw_shape=array.shape, raw_dtype=kind)
            elif kind == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, array.astype(np.float32))
            elif kind == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, array.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)

    write_gguf(out, arch, fill)
