"""Exporting adapters to the runtimes people deploy on, each export checked by that runtime (``lorakit export``).

Formats: ``gguf-lora`` (``gguf_lora``): a llama.cpp / Ollama LoRA adapter over the original GGUF base; ``gguf``
(``gguf_model``): the adapter merged into the base, one standalone GGUF with the base's tokenizer, chat template
and end-of-turn token; ``ollama`` (``ollama``): a directory with a Modelfile and the merged GGUF (or, as an
explicit choice, the base GGUF and the LoRA GGUF under ``ADAPTER``); ``vllm`` (``vllm``): an adapter directory
within vLLM's LoRA constraints. Every export is followed by parity reports (``parity``, with what the checks
share in ``checks``): the artifact run by implementations other than lorakit's (llama.cpp, and transformers' GGUF
loader for merged files; PEFT for the vLLM directory, read as vLLM reads it) against lorakit's own adapted model
on the same prompts. lorakit's side computes in float32 by default (``precision`` fp32), the exact reference the
artifact's rounding is measured against. Where the checks' runtime is not installed (llama-cpp-python, PEFT), the
artifact is written all the same and the result says it is unchecked, unless the check is required
(``require_parity``). ``orchestrate`` runs one export (``run_export`` of an ``ExportRequest``, or
``export_adapter`` with keywords), loading the base model once.

This package only hands names on, imported when first used: ``import lorakit.export`` imports no writer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checks import parity_examples
    from .gguf_lora import GgufLoraExport
    from .gguf_model import GgufModelExport
    from .ollama import OllamaExport
    from .orchestrate import FORMATS, ExportRequest, ExportResult, ParityOptions, export_adapter, run_export
    from .parity import ParityReport
    from .vllm import VllmExport

# each public name, by the module that defines it
_HOMES = {
    "FORMATS": "orchestrate",
    "ExportRequest": "orchestrate",
    "ExportResult": "orchestrate",
    "ParityOptions": "orchestrate",
    "export_adapter": "orchestrate",
    "run_export": "orchestrate",
    "parity_examples": "checks",
    "ParityReport": "parity",
    "GgufLoraExport": "gguf_lora",
    "GgufModelExport": "gguf_model",
    "OllamaExport": "ollama",
    "VllmExport": "vllm",
}

__all__ = [
    "FORMATS",
    "ExportRequest",
    "ExportResult",
    "GgufLoraExport",
    "GgufModelExport",
    "OllamaExport",
    "ParityOptions",
    "ParityReport",
    "VllmExport",
    "export_adapter",
    "parity_examples",
    "run_export",
]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
