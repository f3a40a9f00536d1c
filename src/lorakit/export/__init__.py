"""Exporting adapters to the runtimes people deploy on, each export checked by that runtime (``lorakit export``).

Formats: ``gguf-lora`` (``gguf_lora``): a llama.cpp / Ollama LoRA adapter over the original GGUF base; ``gguf``
(``gguf_model``): the adapter merged into the base, one standalone GGUF with the base's tokenizer, chat template
and end-of-turn token; ``ollama`` (``ollama``): a directory with a Modelfile and the merged GGUF (or, as an
explicit choice, the base GGUF and the LoRA GGUF under ``ADAPTER``); ``vllm`` (``vllm``): an adapter directory
within vLLM's LoRA constraints. Every export is followed by parity reports (``parity``): the artifact run by
implementations other than lorakit's (llama.cpp, and transformers' GGUF loader for merged files; PEFT for the vLLM
directory, read as vLLM reads it) against lorakit's own adapted model on the same prompts. lorakit's side computes
in float32 by default (``precision`` fp32), the exact reference the artifact's rounding is measured against. Where
the checks' runtime is not installed (llama-cpp-python, PEFT), the artifact is written all the same and the result
says it is unchecked, unless the check is required (``require_parity``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..adapters import unload
from ..data import Example, chat_prompt_ids, read_rows, tokenize_row
from ..io import load_adapter
from ..models import DEFAULT_MODEL, gguf_source, load_model, resolve_model_dir
from ..precision import Precision, decide
from .files import check_target, place, staged_directory, staged_file
from .gguf_lora import GgufLoraExport, gguf_lora_file
from .gguf_model import TYPES, GgufModelExport, export_gguf_model
from .ollama import LAYOUTS, MODELFILE, OllamaExport, modelfile
from .parity import (
    ParityReport,
    llama_cpp_parity,
    missing_runtime,
    model_parity,
    require_llama_cpp,
    require_peft,
    require_transformers_gguf,
)
from .vllm import VllmExport, vllm_files

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
    unchecked: str | None = None  # why the checks asked for did not run (their runtime is missing), or None

    @property
    def parity(self) -> ParityReport | None:
        return next(iter(self.checks.values()), None)


@dataclass
class _Plan:
    """The parity checks asked for: which prompts, how many tokens, whether to check the base alone too, and
    the precision lorakit's side computes in."""

    prompts: str | os.PathLike | None
    max_prompts: int
    max_new_tokens: int
    with_base: bool
    precision: Precision

    def bind(self, tokenizer, model) -> _Check:
        examples = parity_examples(tokenizer, self.prompts, self.max_prompts)
        return _Check(examples, _stop_ids(model, tokenizer), self.max_new_tokens, self.with_base, self.precision)


@dataclass
class _Check:
    """What every parity report of one export uses: the prompts, lorakit's stop tokens and its precision."""

    examples: list[Example]
    stop_ids: set[int]
    max_new_tokens: int
    with_base: bool = False
    precision: Precision | None = None


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
    require_parity: bool = False,
    with_base: bool = False,
    merged: bool = False,
    ollama_layout: str | None = None,
    overwrite: bool = False,
    precision: str = "fp32",
) -> ExportResult:
    """Export the adapter in ``adapter_dir`` for ``model`` (an HF directory, a ``.gguf`` file or ``default``)
    as ``fmt`` at ``out``, then check the artifact in other runtimes (``parity``).

    ``dtype``: of the adapter tensors (``gguf-lora``, ``ollama`` in the adapter layout: f32, f16) or of the
    merged weights (``gguf``, ``ollama``: see ``gguf_model.TYPES``); default f32 for adapters, f16 for merged
    models.
    ``base_gguf``: the base's GGUF (what llama.cpp runs the adapter over, and where a merged file takes its
    tokenizer and chat template from); default: ``model`` itself when it is a GGUF file, or the embedded one.
    ``prompts``: a data file whose rows' prompts (and answers, when present) the checks use, at most
    ``max_prompts``; default: a few built-in chat prompts. ``with_base``: also check the GGUF base alone.
    ``ollama_layout``: for ``ollama``, ``merged`` (the default: one merged GGUF) or ``adapter`` (the base GGUF
    plus the adapter under ``ADAPTER``, which Ollama 0.34.1 and later refuse at ``ollama create``); ``merged``:
    the older spelling of ``ollama_layout="merged"``, kept for callers that pass it. ``precision``: what
    lorakit's side of the checks computes in (see ``lorakit.precision``); fp32 by default, so that the figures
    measure the artifact and its runtime, not bf16 products on lorakit's side. Merged files are merged in
    float32 whatever it is.

    ``parity``: check the artifact when the check's runtime (llama-cpp-python for the GGUF formats, PEFT for
    ``vllm``) is installed; without it the artifact is written unchecked and ``ExportResult.unchecked`` says
    why and how to install it, unless ``require_parity``, which makes a missing runtime an error before
    anything is written.

    All or nothing: whether every check can run (its runtime importable, a GGUF base, the prompts) is decided
    before anything is written; the artifact is then written beside ``out``, checked there, and moved into
    place only when every check has run. On any error nothing is left at ``out`` (with ``overwrite``, what was
    there stays as it was). A check's figures are not judged here (``--min-agreement`` is the caller's).

    Raises:
        ValueError: an unknown format, layout, dtype or precision (or one the CPU lacks), a check that cannot
            run (its runtime missing) with ``require_parity``, a check that cannot run for another reason, a
            model without a GGUF base where one is needed, an adapter that does not fit the base, an existing
            ``out`` without ``overwrite``, everything the format's writer refuses (see ``gguf_lora_file``,
            ``export_gguf_model``, ``vllm_files``), and a check that fails.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    merged = _merged_layout(fmt, merged, ollama_layout)
    if require_parity and not parity:
        raise ValueError("--require-parity and --no-parity contradict each other: drop one")
    out = Path(out)
    unchecked = missing_runtime(fmt) if parity else None
    if unchecked and require_parity:
        raise ValueError(f"--require-parity: the parity check cannot run: {unchecked}; nothing was written")
    checking = parity and not unchecked
    check = _Plan(prompts, max_prompts, max_new_tokens, with_base, decide(precision, "cpu")) if checking else None
    if fmt == "vllm":
        if dtype is not None:
            raise ValueError("--dtype does not apply to --format vllm: the adapter keeps the dtype it was saved in")
        check_target(out, overwrite, directory=True)
        _require_runtimes(fmt, False, check)
        return replace(_export_vllm(adapter_dir, out, model, check, overwrite), unchecked=unchecked)
    dtype = dtype or ("f16" if merged else "f32")
    allowed = TYPES if merged else ("f32", "f16")
    if dtype not in allowed:
        raise ValueError(f"--dtype {dtype!r} is not available for --format {fmt}; use one of {', '.join(allowed)}")
    check_target(out, overwrite, directory=fmt == "ollama")
    base = _gguf_base(model, base_gguf, needed_for=None if fmt == "gguf-lora" and check is None else fmt)
    _require_runtimes(fmt, merged, check)
    if fmt == "gguf-lora":
        result = _export_gguf_lora(adapter_dir, out, model, dtype, base, check, overwrite)
    elif fmt == "gguf":
        result = _export_gguf(adapter_dir, out, model, dtype, base, check, overwrite)
    else:
        result = _export_ollama(adapter_dir, out, model, dtype, base, merged, check, overwrite)
    return replace(result, unchecked=unchecked)


def _merged_layout(fmt: str, merged: bool, ollama_layout: str | None) -> bool:
    """Whether the export is a merged model: always for ``gguf``, never for ``gguf-lora`` and ``vllm``, and for
    ``ollama`` unless ``ollama_layout`` is ``adapter``. ``merged`` (the older ``--merged``) applies to ollama
    only and contradicts the adapter layout."""
    if merged and fmt != "ollama":
        raise ValueError("--merged applies to --format ollama (gguf is always merged, gguf-lora never)")
    if ollama_layout is None:
        return fmt in ("gguf", "ollama")
    if fmt != "ollama":
        raise ValueError(f"--ollama-layout applies to --format ollama, not {fmt}")
    if ollama_layout not in LAYOUTS:
        raise ValueError(f"--ollama-layout {ollama_layout!r} is not supported; use one of {', '.join(LAYOUTS)}")
    if merged and ollama_layout != "merged":
        raise ValueError(f"--merged and --ollama-layout {ollama_layout} contradict each other: drop one")
    return ollama_layout == "merged"


def _require_runtimes(fmt: str, merged: bool, check: _Plan | None) -> None:
    """Every runtime the export's checks run in must be there (``check``: the checks that will run; a missing
    llama-cpp-python or PEFT has already made it None, or an error under ``require_parity``): decided before
    anything is written, so that a check that cannot run stops the command with the fix (install it, or
    --no-parity) and no file to remove."""
    if check is None:
        return
    if fmt == "vllm":
        require_peft()
        return
    require_llama_cpp()
    if merged:
        require_transformers_gguf()


def _checked(run: Callable[[], dict[str, ParityReport]], staged: Path, out: Path) -> dict[str, ParityReport]:
    """The checks' reports; a check that fails ends the export as one error line (llama.cpp, transformers and
    PEFT raise their own exception types), and the staging around this call then removes the artifact. The
    staged path in a message is named as ``out``, the path the user gave."""
    try:
        return run()
    except Exception as err:
        detail = " ".join(str(err).replace(str(staged), str(out)).split()) or type(err).__name__
        raise ValueError(
            f"the parity check of {out} failed ({detail}); the export was not kept. Fix the cause, or pass "
            "--no-parity to write it unchecked"
        ) from err


def _export_gguf_lora(adapter_dir, out: Path, model, dtype, base: Path | None, check, overwrite) -> ExportResult:
    from transformers import AutoConfig

    contents = gguf_lora_file(adapter_dir, AutoConfig.from_pretrained(resolve_model_dir(model)), dtype=dtype)
    checks = None if check is None else _gguf_lora_checks(adapter_dir, model, check)
    with staged_file(out, overwrite) as staged:
        artifact = contents.write(staged)
        reports = {} if checks is None else _checked(lambda: checks(base, staged), staged, out)
    artifact = replace(artifact, path=out)
    return ExportResult(artifact, reports, run=f"llama-cli -m {base or 'BASE.gguf'} --lora {out}")


def _gguf_lora_checks(adapter_dir, model, check: _Plan) -> Callable[[Path, Path], dict[str, ParityReport]]:
    """What the checks of a LoRA GGUF compare with (lorakit's adapted model, the prompts), loaded before the
    file is written; the function returned runs them on ``(base GGUF, adapter GGUF)``."""
    adapted, tokenizer = _adapted(adapter_dir, model, check.precision)
    context = check.bind(tokenizer, adapted)
    plain = load_model(model, dtype=check.precision.storage)[0] if context.with_base else None

    def run(base: Path, adapter_file: Path) -> dict[str, ParityReport]:
        checks = {"adapter": llama_cpp_parity(adapted, context.examples, base, adapter_file, **_ours(context))}
        if plain is not None:
            checks["base"] = llama_cpp_parity(plain, context.examples, base, None, **_ours(context))
        return checks

    return run


def _export_gguf(adapter_dir, out: Path, model, dtype, base: Path, check, overwrite) -> ExportResult:
    plain, tokenizer = _merged(adapter_dir, model)
    checks = None if check is None else _gguf_checks(plain, tokenizer, dtype, check, adapter_dir, model)
    with staged_file(out, overwrite) as staged:
        artifact = export_gguf_model(plain, base, staged, dtype=dtype)
        reports = {} if checks is None else _checked(lambda: checks(staged), staged, out)
    return ExportResult(replace(artifact, path=out), reports, run=f"llama-cli -m {out} -cnv")


def _merged(adapter_dir, model) -> tuple[torch.nn.Module, object]:
    """The base with the adapter merged in float32 and the wrappers removed: lorakit's adapted model."""
    adapted, tokenizer = load_model(model)
    load_adapter(adapted, adapter_dir)
    return unload(adapted, merge=True), tokenizer


def _adapted(adapter_dir, model, precision: Precision) -> tuple[torch.nn.Module, object]:
    """lorakit's adapted model as it computes in ``precision``: the base in the precision's storage dtype, the
    adapter in its trained dtype (float32 under the mixed precisions, bf16 under pure bf16)."""
    adapted, tokenizer = load_model(model, dtype=precision.storage)
    load_adapter(adapted, adapter_dir, adapter_dtype=precision.trained)
    return adapted, tokenizer


def _lorakit_side(plain: torch.nn.Module, adapter_dir, model, check: _Plan) -> torch.nn.Module:
    """What a merged file's checks compare with: in fp32 the float32 merge itself (the same maths as the
    adapted model, to float32 rounding); in another precision the adapted model as it computes there."""
    if check.precision.storage == torch.float32:
        return plain
    return _adapted(adapter_dir, model, check.precision)[0]


def _gguf_checks(
    plain, tokenizer, dtype: str, check: _Plan, adapter_dir, model
) -> Callable[[Path], dict[str, ParityReport]]:
    """The checks of a merged GGUF ``file`` (``plain``, the float32 merge, written as ``dtype``): in llama.cpp
    and in transformers' GGUF loader, each against lorakit, and against each other. The transformers reading
    computes in float32, so with lorakit in fp32 its distance to lorakit is the drift the file's rounding to
    ``dtype`` causes. The prompts are read before the file is written."""
    import transformers
    from transformers import AutoModelForCausalLM

    ours = _lorakit_side(plain, adapter_dir, model, check)
    context = check.bind(tokenizer, ours)

    def run(file: Path) -> dict[str, ParityReport]:
        checks = {"llama.cpp": llama_cpp_parity(ours, context.examples, file, None, **_ours(context))}
        reread = _quiet(
            lambda: AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        )
        label = f"transformers {transformers.__version__} GGUF loader ({dtype} weights, float32 products)"
        checks["transformers"] = model_parity(ours, context.examples, reread, label, **_ours(context))
        checks["llama.cpp vs transformers"] = llama_cpp_parity(
            reread, context.examples, file, None, reference="transformers' GGUF loader", **_decoding(context)
        )
        return checks

    return run


def _export_ollama(adapter_dir, out: Path, model, dtype, base: Path, merged: bool, check, overwrite) -> ExportResult:
    """The Ollama directory, built and checked in a staged directory that replaces ``out`` once all is done."""
    from transformers import AutoConfig, AutoTokenizer

    if merged:
        plain, tokenizer = _merged(adapter_dir, model)
        model_file, adapter_file = "model.gguf", None
        checks = None if check is None else _gguf_checks(plain, tokenizer, dtype, check, adapter_dir, model)
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model))
        model_file, adapter_file = base.name, "adapter.gguf"
        contents = gguf_lora_file(adapter_dir, AutoConfig.from_pretrained(resolve_model_dir(model)), dtype=dtype)
        checks = None if check is None else _gguf_lora_checks(adapter_dir, model, check)
    text, family, stops = modelfile(model_file, adapter_file, tokenizer)
    with staged_directory(out, overwrite) as tmp:
        if merged:
            written = export_gguf_model(plain, base, tmp / model_file, dtype=dtype)
        else:
            written = contents.write(tmp / adapter_file)
            place(base, tmp / model_file)
        (tmp / MODELFILE).write_text(text)
        files = [tmp / name for name in (model_file, adapter_file) if name]  # what the checks run
        reports = {} if checks is None else _checked(lambda: checks(*files), tmp, out)
    part = replace(written, path=out / written.path.name).describe()
    artifact = OllamaExport(out, model_file, adapter_file, family, stops, [part])
    return ExportResult(artifact, reports, run=artifact.command(out.name.lower().replace("_", "-") or "lorakit"))


def _export_vllm(adapter_dir, out: Path, model, check: _Plan | None, overwrite) -> ExportResult:
    """The vLLM directory, built and read back with PEFT in a staged directory that replaces ``out`` once the
    check has run."""
    files = vllm_files(adapter_dir)
    checks = None if check is None else _vllm_checks(adapter_dir, model, check)
    with staged_directory(out, overwrite) as tmp:
        files.write(tmp)
        reports = {} if checks is None else _checked(lambda: checks(tmp), tmp, out)
    artifact = files.result(out)
    return ExportResult(artifact, reports, run=artifact.command(out.name))


def _vllm_checks(adapter_dir, model, check: _Plan) -> Callable[[Path], dict[str, ParityReport]]:
    """lorakit's adapted model, the base for PEFT and the prompts, loaded before the directory is written; the
    function returned reads a written ``directory`` with PEFT (as vLLM reads it) and compares."""
    peft = require_peft()
    adapted, tokenizer = _adapted(adapter_dir, model, check.precision)
    base, _ = load_model(model)  # PEFT's side: float32, as it is read
    context = check.bind(tokenizer, adapted)

    def run(directory: Path) -> dict[str, ParityReport]:
        reread = peft.PeftModel.from_pretrained(base, str(directory))
        label = f"PEFT {peft.__version__} (vLLM's reading of the file: one scaling for every layer)"
        return {"peft": model_parity(adapted, context.examples, reread, label, **_ours(context))}

    return run


def _decoding(context: _Check) -> dict:
    return {"stop_ids": context.stop_ids, "max_new_tokens": context.max_new_tokens}


def _ours(context: _Check) -> dict:
    """``_decoding`` for a report whose reference side is lorakit's model, which computes in the precision."""
    return {**_decoding(context), "precision": context.precision}


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
        path = gguf_source(base_gguf)
        if path is None:
            raise ValueError(
                f"--base-gguf {base_gguf} names no GGUF file: give a local .gguf file or one in a Hugging Face repo "
                "(org/name:file.gguf)"
            )
    elif (path := gguf_source(model)) is not None:
        pass
    elif needed_for is None:
        return None
    else:
        way_out = ", or --no-parity" if needed_for == "gguf-lora" else ""
        raise ValueError(
            f"{_NEEDS_BASE[needed_for]}, and --model {model} is a Hugging Face model: pass --base-gguf FILE (the "
            f"base converted with llama.cpp's convert_hf_to_gguf.py, or a file in a Hub repo: org/name:file.gguf)"
            f"{way_out}"
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
