"""Exporting adapters to the runtimes people deploy on, each export checked by that runtime (``lorakit export``).

Formats: ``gguf-lora`` (``gguf_lora``): a llama.cpp / Ollama LoRA adapter over the original GGUF base;
``vllm`` (``vllm``): an adapter directory within vLLM's LoRA constraints. Every export is followed by a parity
report (``parity``): the artifact run by another implementation (llama.cpp; PEFT for the vLLM directory, read
as vLLM reads it) against lorakit's own adapted model on the same prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..data import Example, chat_prompt_ids, read_rows, tokenize_row
from ..io import load_adapter
from ..models import DEFAULT_MODEL, default_gguf, load_model, resolve_model_dir
from .gguf_lora import GgufLoraExport, export_gguf_lora
from .parity import ParityReport, llama_cpp_parity, peft_parity
from .vllm import VllmExport, export_vllm

FORMATS = ("gguf-lora", "vllm")
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
    "ParityReport",
    "VllmExport",
    "export_adapter",
    "parity_examples",
]


@dataclass
class ExportResult:
    artifact: GgufLoraExport | VllmExport
    parity: ParityReport | None
    base_parity: ParityReport | None = None  # the base GGUF alone, when asked for: what the adapter changes


def export_adapter(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    fmt: str = "gguf-lora",
    dtype: str = "f32",
    base_gguf: str | os.PathLike | None = None,
    prompts: str | os.PathLike | None = None,
    max_prompts: int = 32,
    max_new_tokens: int = 16,
    parity: bool = True,
    with_base: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Export the adapter in ``adapter_dir`` for ``model`` (an HF directory, a ``.gguf`` file or ``default``)
    as ``fmt`` at ``out``, then check the artifact in llama.cpp (``parity``).

    ``base_gguf``: the GGUF base the adapter runs over in llama.cpp; default: ``model`` itself when it is a
    GGUF file or the embedded model. ``prompts``: a data file whose rows' prompts (and answers, when present)
    the check uses, at most ``max_prompts``; default: a few built-in chat prompts.

    Raises:
        ValueError: an unknown format, a model without a GGUF base for the check, and everything the
            format's writer refuses (see ``export_gguf_lora``).
    """
    from transformers import AutoConfig

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    if fmt == "vllm":
        return _export_vllm(adapter_dir, out, model, prompts, max_prompts, max_new_tokens, parity, overwrite)
    gguf_base = _gguf_base(model, base_gguf) if parity else None
    config = AutoConfig.from_pretrained(resolve_model_dir(model))
    artifact = export_gguf_lora(adapter_dir, config, out, dtype=dtype, overwrite=overwrite)
    if not parity:
        return ExportResult(artifact, None)
    adapted, tokenizer = load_model(model)
    load_adapter(adapted, adapter_dir)
    examples = parity_examples(tokenizer, prompts, max_prompts)
    stops = _stop_ids(adapted, tokenizer)
    report = llama_cpp_parity(adapted, examples, gguf_base, out, stop_ids=stops, max_new_tokens=max_new_tokens)
    base_report = None
    if with_base:
        plain, _ = load_model(model)
        base_report = llama_cpp_parity(plain, examples, gguf_base, None, stop_ids=stops, max_new_tokens=max_new_tokens)
    return ExportResult(artifact, report, base_report)


def _export_vllm(adapter_dir, out, model, prompts, max_prompts, max_new_tokens, parity, overwrite) -> ExportResult:
    artifact = export_vllm(adapter_dir, out, overwrite=overwrite)
    if not parity:
        return ExportResult(artifact, None)
    try:
        from peft import PeftModel
    except ImportError:
        raise ValueError("the vLLM export's check reads it with PEFT: pip install peft, or pass --no-parity") from None
    adapted, tokenizer = load_model(model)
    load_adapter(adapted, adapter_dir)
    base, _ = load_model(model)
    reference = PeftModel.from_pretrained(base, str(out))
    examples = parity_examples(tokenizer, prompts, max_prompts)
    stops = _stop_ids(adapted, tokenizer)
    return ExportResult(
        artifact, peft_parity(adapted, examples, reference, stop_ids=stops, max_new_tokens=max_new_tokens)
    )


def _gguf_base(model: str, base_gguf: str | os.PathLike | None) -> Path:
    if base_gguf is not None:
        path = Path(base_gguf)
    elif str(model) == DEFAULT_MODEL:
        path = default_gguf()
    elif Path(model).suffix == ".gguf":
        path = Path(model)
    else:
        raise ValueError(
            f"the parity check runs the adapter in llama.cpp over a GGUF base, and --model {model} is a Hugging "
            "Face directory: pass --base-gguf FILE (the base converted with llama.cpp's convert_hf_to_gguf.py), "
            "or --no-parity"
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
