"""Exporting adapters to the runtimes people deploy on, each export checked by that runtime (``lorakit export``).

Formats: ``gguf-lora`` (``gguf_lora``): a llama.cpp / Ollama LoRA adapter over the original GGUF base;
``gguf`` (``gguf_model``): the adapter merged into the base, one standalone GGUF with the base's tokenizer,
chat template and end-of-turn token; ``ollama`` (``ollama``): a directory with the GGUF file(s) and a
Modelfile; ``vllm`` (``vllm``): an adapter directory within vLLM's LoRA constraints. Every export is followed
by parity reports (``parity``): the artifact run by implementations other than lorakit's (llama.cpp, and
transformers' GGUF loader for merged files; PEFT for the vLLM directory, read as vLLM reads it) against
lorakit's own adapted model on the same prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import unload
from ..data import Example, chat_prompt_ids, read_rows, tokenize_row
from ..io import load_adapter
from ..models import DEFAULT_MODEL, default_gguf, load_model, resolve_model_dir
from .files import place, staged_directory
from .gguf_lora import GgufLoraExport, export_gguf_lora
from .gguf_model import TYPES, GgufModelExport, export_gguf_model
from .ollama import MODELFILE, OllamaExport, modelfile
from .parity import ParityReport, llama_cpp_parity, model_parity
from .vllm import VllmExport, export_vllm

FORMATS = ("gguf-lora", "gguf", "ollama", "vllm")
# Chat prompts for the parity check when no --prompts file is given.
BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Write the date May 3rd, 1999 as YYYY-MM-DD.",
    "Name three colours.",
    "Explain LoRA in one sentence.",
    "What is 12 plus 30?",
    "Translate 'good morning' into French.",
)

__all__ = [
    "FORMATS",
    "ExportResult",
    "GgufLoraExport",
    "GgufModelExport",
    "OllamaExport",
    "ParityReport",
    "VllmExport",
    "export_adapter",
    "parity_examples",
]


@dataclass
class ExportResult:
    artifact: GgufLoraExport | GgufModelExport | OllamaExport | VllmExport
    checks: dict[str, ParityReport] = field(default_factory=dict)  # the first is the one --min-agreement reads
    run: str = ""  # the command that runs the export

    @property
    def parity(self) -> ParityReport | None:
        return next(iter(self.checks.values()), None)


@dataclass
class _Plan:
    """The parity checks asked for: which prompts, how many tokens, whether to check the base alone too."""

    prompts: str | os.PathLike | None
    max_prompts: int
    max_new_tokens: int
    with_base: bool

    def bind(self, tokenizer, model) -> _Check:
        examples = parity_examples(tokenizer, self.prompts, self.max_prompts)
        return _Check(examples, _stop_ids(model, tokenizer), self.max_new_tokens, self.with_base)


@dataclass
class _Check:
    """What every parity report of one export uses: the prompts and lorakit's stop tokens."""

    examples: list[Example]
    stop_ids: set[int]
    max_new_tokens: int
    with_base: bool = False


def export_adapter(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    fmt: str = "gguf-lora",
    dtype: str | None = None,
    base_gguf: str | os.PathLike | None = None,
    prompts: str | os.PathLike | None = None,
    max_prompts: int = 32,
    max_new_tokens: int = 16,
    parity: bool = True,
    with_base: bool = False,
    merged: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Export the adapter in ``adapter_dir`` for ``model`` (an HF directory, a ``.gguf`` file or ``default``)
    as ``fmt`` at ``out``, then check the artifact in other runtimes (``parity``).

    ``dtype``: of the adapter tensors (``gguf-lora``: f32, f16) or of the merged weights (``gguf``,
    ``ollama --merged``: see ``gguf_model.TYPES``); default f32 for adapters, f16 for merged models.
    ``base_gguf``: the base's GGUF (what llama.cpp runs the adapter over, and where a merged file takes its
    tokenizer and chat template from); default: ``model`` itself when it is a GGUF file, or the embedded one.
    ``prompts``: a data file whose rows' prompts (and answers, when present) the checks use, at most
    ``max_prompts``; default: a few built-in chat prompts. ``with_base``: also check the GGUF base alone.
    ``merged``: for ``ollama``, one merged GGUF instead of the base plus the adapter.

    Raises:
        ValueError: an unknown format or dtype, a model without a GGUF base where one is needed, an adapter
            that does not fit the base, an existing ``out`` without ``overwrite``, and everything the
            format's writer refuses (see ``export_gguf_lora``, ``export_gguf_model``, ``export_vllm``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if merged and fmt != "ollama":
        raise ValueError("--merged applies to --format ollama (gguf is always merged, gguf-lora never)")
    out = Path(out)
    check = _Plan(prompts, max_prompts, max_new_tokens, with_base) if parity else None
    if fmt == "vllm":
        if dtype is not None:
            raise ValueError("--dtype does not apply to --format vllm: the adapter keeps the dtype it was saved in")
        return _export_vllm(adapter_dir, out, model, check, overwrite)
    merged = merged or fmt == "gguf"
    dtype = dtype or ("f16" if merged else "f32")
    allowed = TYPES if merged else ("f32", "f16")
    if dtype not in allowed:
        raise ValueError(f"--dtype {dtype!r} is not available for --format {fmt}; use one of {', '.join(allowed)}")
    base = _gguf_base(model, base_gguf, needed_for=None if fmt == "gguf-lora" and not parity else fmt)
    if fmt == "gguf-lora":
        return _export_gguf_lora(adapter_dir, out, model, dtype, base, check, overwrite)
    if fmt == "gguf":
        return _export_gguf(adapter_dir, out, model, dtype, base, check, overwrite)
    return _export_ollama(adapter_dir, out, model, dtype, base, merged, check, overwrite)


def _export_gguf_lora(adapter_dir, out: Path, model, dtype, base: Path | None, check, overwrite) -> ExportResult:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_dir(model))
    artifact = export_gguf_lora(adapter_dir, config, out, dtype=dtype, overwrite=overwrite)
    result = ExportResult(artifact, run=f"llama-cli -m {base or 'BASE.gguf'} --lora {out}")
    if check is not None:
        result.checks = _gguf_lora_checks(adapter_dir, model, base, out, check)
    return result


def _gguf_lora_checks(adapter_dir, model, base: Path, adapter_file: Path, check) -> dict[str, ParityReport]:
    adapted, tokenizer = load_model(model)
    load_adapter(adapted, adapter_dir)
    context = check.bind(tokenizer, adapted)
    checks = {"adapter": llama_cpp_parity(adapted, context.examples, base, adapter_file, **_decoding(context))}
    if context.with_base:
        plain, _ = load_model(model)
        checks["base"] = llama_cpp_parity(plain, context.examples, base, None, **_decoding(context))
    return checks


def _export_gguf(adapter_dir, out: Path, model, dtype, base: Path, check, overwrite) -> ExportResult:
    plain, tokenizer = _merged(adapter_dir, model)
    artifact = export_gguf_model(plain, base, out, dtype=dtype, overwrite=overwrite)
    result = ExportResult(artifact, run=f"llama-cli -m {out} -cnv")
    if check is not None:
        result.checks = _gguf_checks(plain, tokenizer, out, dtype, check)
    return result


def _merged(adapter_dir, model) -> tuple[torch.nn.Module, object]:
    """The base with the adapter merged in float32 and the wrappers removed: lorakit's adapted model."""
    adapted, tokenizer = load_model(model)
    load_adapter(adapted, adapter_dir)
    return unload(adapted, merge=True), tokenizer


def _gguf_checks(plain, tokenizer, file: Path, dtype: str, check) -> dict[str, ParityReport]:
    """A merged GGUF in llama.cpp and in transformers' GGUF loader, each against lorakit, and against each
    other. The transformers reading computes in float32, so its distance to lorakit is the drift the file's
    rounding to ``dtype`` causes."""
    import transformers
    from transformers import AutoModelForCausalLM

    context = check.bind(tokenizer, plain)
    checks = {"llama.cpp": llama_cpp_parity(plain, context.examples, file, None, **_decoding(context))}
    reread = _quiet(lambda: AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32))
    label = f"transformers {transformers.__version__} GGUF loader ({dtype} weights, float32 products)"
    checks["transformers"] = model_parity(plain, context.examples, reread, label, **_decoding(context))
    checks["llama.cpp vs transformers"] = llama_cpp_parity(
        reread, context.examples, file, None, reference="transformers' GGUF loader", **_decoding(context)
    )
    return checks


def _export_ollama(adapter_dir, out: Path, model, dtype, base: Path, merged: bool, check, overwrite) -> ExportResult:
    from transformers import AutoConfig, AutoTokenizer

    parts = []
    plain = None
    with staged_directory(out, overwrite) as tmp:
        if merged:
            plain, tokenizer = _merged(adapter_dir, model)
            model_file, adapter_file = "model.gguf", None
            parts.append(export_gguf_model(plain, base, tmp / model_file, dtype=dtype).describe())
        else:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model))
            model_file, adapter_file = base.name, "adapter.gguf"
            config = AutoConfig.from_pretrained(resolve_model_dir(model))
            parts.append(export_gguf_lora(adapter_dir, config, tmp / adapter_file, dtype=dtype).describe())
            place(base, tmp / model_file)
        text, family, stops = modelfile(model_file, adapter_file, tokenizer)
        (tmp / MODELFILE).write_text(text)
    parts = [p.replace(str(tmp), str(out)) for p in parts]
    artifact = OllamaExport(out, model_file, adapter_file, family, stops, parts)
    result = ExportResult(artifact, run=artifact.command(out.name.lower().replace("_", "-") or "lorakit"))
    if check is not None:
        if merged:
            result.checks = _gguf_checks(plain, tokenizer, out / model_file, dtype, check)
        else:
            result.checks = _gguf_lora_checks(adapter_dir, model, out / model_file, out / adapter_file, check)
    return result


def _export_vllm(adapter_dir, out: Path, model, check: _Plan | None, overwrite) -> ExportResult:
    artifact = export_vllm(adapter_dir, out, overwrite=overwrite)
    result = ExportResult(artifact, run=artifact.command(out.name))
    if check is None:
        return result
    try:
        import peft
        from peft import PeftModel
    except ImportError:
        raise ValueError("the vLLM export's check reads it with PEFT: pip install peft, or pass --no-parity") from None
    adapted, tokenizer = load_model(model)
    load_adapter(adapted, adapter_dir)
    base, _ = load_model(model)
    reread = PeftModel.from_pretrained(base, str(out))
    context = check.bind(tokenizer, adapted)
    label = f"PEFT {peft.__version__} (vLLM's reading of the file: one scaling for every layer)"
    result.checks = {"peft": model_parity(adapted, context.examples, reread, label, **_decoding(context))}
    return result


def _decoding(context: _Check) -> dict:
    return {"stop_ids": context.stop_ids, "max_new_tokens": context.max_new_tokens}


def _quiet(load):
    """Run a transformers loader without its warnings (its progress bar stays: the GGUF dequantizes slowly)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load()
    finally:
        hf_logging.set_verbosity(verbosity)


_NEEDS_BASE = {
    "gguf-lora": "the parity check runs the adapter in llama.cpp over a GGUF base",
    "gguf": "the merged GGUF takes its tokenizer, chat template and hyperparameters from the base's GGUF",
    "ollama": "the Ollama directory holds the base's GGUF (FROM) or takes its tokenizer from it",
}


def _gguf_base(model: str, base_gguf: str | os.PathLike | None, needed_for: str | None) -> Path | None:
    """The base model's GGUF file; ``needed_for``: the format that needs one (an error names it), or None."""
    if base_gguf is not None:
        path = Path(base_gguf)
    elif str(model) == DEFAULT_MODEL:
        path = default_gguf()
    elif Path(model).suffix == ".gguf":
        path = Path(model)
    elif needed_for is None:
        return None
    else:
        way_out = ", or --no-parity" if needed_for == "gguf-lora" else ""
        raise ValueError(
            f"{_NEEDS_BASE[needed_for]}, and --model {model} is a Hugging Face directory: pass --base-gguf FILE "
            f"(the base converted with llama.cpp's convert_hf_to_gguf.py){way_out}"
        )
    if not path.is_file():
        raise ValueError(f"--base-gguf {path} does not exist")
    return path


def parity_examples(tokenizer, prompts: str | os.PathLike | None, limit: int) -> list[Example]:
    """The check's prompts: rows of a data file (with their answers, when present), or the built-in chats."""
    if prompts is None:
        rows = [
            (f"built-in prompt {i + 1}", {"messages": [{"role": "user", "content": p}]})
            for i, p in enumerate(BUILTIN_PROMPTS)
        ]
    else:
        rows = read_rows(prompts)
    examples = []
    for where, row in rows[:limit]:
        if "messages" in row and row["messages"] and row["messages"][-1].get("role") == "user":
            ids = chat_prompt_ids(tokenizer, row["messages"])
            examples.append(Example(ids, list(ids), len(ids), len(ids)))
            continue
        example, _ = tokenize_row(row, where, tokenizer, completion_only=True)
        if example.answer_start is None:
            raise ValueError(
                f"{where}: a parity prompt needs a prompt (prompt / completion or chat rows), not plain text"
            )
        examples.append(example)
    if not examples:
        raise ValueError(f"{prompts}: no rows to check the export with")
    return examples


def _stop_ids(model, tokenizer) -> set[int]:
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return stops
