"""One export from request to checked artifact (``lorakit export``): validate everything first, load the base
model at most once, write the artifact in its staged place, run the parity checks on it there, and move it
into place (see the package docstring for the formats, ``checks`` and ``parity`` for the checks).

The base model is loaded once per export, in float32 as stored, and shared: lorakit's adapted model for the
checks is built on it (cast to the check's precision: bit for bit what a load in that dtype gives), on a copy
where the export needs the base again (the merged writers' float32 merge, PEFT's reading of a vLLM directory,
the base-only check of ``with_base``). An export without checks loads no model unless it writes merged
weights.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from ..adapters import unload
from ..io import load_adapter
from ..models import DEFAULT_MODEL, gguf_source, load_model, resolve_model_dir
from ..precision import Precision, decide
from ..stopping import gguf_stop_ids
from .checks import CheckContext, CheckPlan, checked, quiet, require_runtimes
from .files import check_target, place, staged_directory, staged_file
from .gguf_lora import GgufLoraExport, gguf_lora_file
from .gguf_model import TYPES, GgufModelExport, export_gguf_model
from .ollama import LAYOUTS, MODELFILE, OllamaExport, modelfile
from .parity import ParityReport, llama_cpp_parity, missing_runtime, model_parity, require_peft
from .vllm import VllmExport, vllm_files

FORMATS = ("gguf-lora", "gguf", "ollama", "vllm")

RunChecks = Callable[..., dict[str, ParityReport]]  # runs an export's checks on its written file(s)


@dataclass(frozen=True)
class ParityOptions:
    """The parity checks an export runs. ``enabled``: check the artifact when the check's runtime
    (llama-cpp-python for the GGUF formats, PEFT for ``vllm``) is installed, else write it unchecked and say
    why; ``required``: a missing runtime is an error before anything is written. ``prompts``: a data file whose
    rows' prompts (and answers) the checks use, at most ``max_prompts`` (default: built-in chat prompts);
    ``max_new_tokens``: per prompt without an answer; ``with_base``: also check the GGUF base alone;
    ``precision``: what lorakit's side computes in (``lorakit.precision``; fp32, the exact reference)."""

    enabled: bool = True
    required: bool = False
    prompts: str | os.PathLike | None = None
    max_prompts: int = 32
    max_new_tokens: int = 16
    with_base: bool = False
    precision: str = "fp32"


# export_adapter's keywords that belong to ParityOptions, by their field there
_PARITY_KEYWORDS = {"parity": "enabled", "require_parity": "required"} | {
    name: name for name in ("prompts", "max_prompts", "max_new_tokens", "with_base", "precision")
}


@dataclass(frozen=True)
class ExportRequest:
    """One export: the adapter in ``adapter_dir`` for ``model`` (an HF directory, a ``.gguf`` file, a Hub id
    or ``default``) as ``fmt`` at ``out``, checked as ``parity`` says.

    ``dtype``: of the adapter tensors (``gguf-lora``, ``ollama`` in the adapter layout: f32, f16) or of the
    merged weights (``gguf``, ``ollama``: see ``gguf_model.TYPES``); default f32 for adapters, f16 for merged
    models (merged in float32 whatever the checks' precision). ``base_gguf``: the base's GGUF (what llama.cpp
    runs the adapter over, and where a merged file takes its tokenizer and chat template from); default:
    ``model`` itself when it is a GGUF file, or the embedded one. ``ollama_layout``: for ``ollama``, ``merged``
    (the default: one merged GGUF) or ``adapter`` (the base GGUF plus the adapter under ``ADAPTER``, which
    Ollama 0.34.1 and later refuse at ``ollama create``); ``merged``: the older spelling of
    ``ollama_layout="merged"``. ``overwrite``: replace an existing ``out``.
    """

    adapter_dir: str | os.PathLike
    out: str | os.PathLike
    model: str = DEFAULT_MODEL
    fmt: str = "gguf-lora"
    dtype: str | None = None
    base_gguf: str | os.PathLike | None = None
    ollama_layout: str | None = None
    merged: bool = False
    overwrite: bool = False
    parity: ParityOptions = field(default_factory=ParityOptions)

    @classmethod
    def of(cls, adapter_dir: str | os.PathLike, out: str | os.PathLike, **options) -> ExportRequest:
        """The request ``export_adapter``'s flat keywords describe: ``parity`` (ParityOptions.enabled),
        ``require_parity`` (``required``), ``prompts``, ``max_prompts``, ``max_new_tokens``, ``with_base`` and
        ``precision`` for the checks, the others as ExportRequest's fields."""
        own = {f.name for f in fields(cls)} - {"adapter_dir", "out", "parity"}
        unknown = sorted(set(options) - own - set(_PARITY_KEYWORDS))
        if unknown:
            raise TypeError(f"export_adapter() got an unexpected keyword argument {unknown[0]!r}")
        checks = ParityOptions(**{_PARITY_KEYWORDS[k]: v for k, v in options.items() if k in _PARITY_KEYWORDS})
        return cls(adapter_dir, out, **{k: v for k, v in options.items() if k in own}, parity=checks)


@dataclass
class ExportResult:
    artifact: GgufLoraExport | GgufModelExport | OllamaExport | VllmExport
    checks: dict[str, ParityReport] = field(default_factory=dict)  # the first is the one --min-agreement reads
    run: str = ""  # the command that runs the export
    unchecked: str | None = None  # why the checks asked for did not run (their runtime is missing), or None

    @property
    def parity(self) -> ParityReport | None:
        return next(iter(self.checks.values()), None)


def export_adapter(adapter_dir: str | os.PathLike, out: str | os.PathLike, **options) -> ExportResult:
    """``run_export`` with the request given as keywords (``ExportRequest.of``): ``model``, ``fmt``, ``dtype``,
    ``base_gguf``, ``ollama_layout``, ``merged``, ``overwrite``, and for the checks ``parity``,
    ``require_parity``, ``prompts``, ``max_prompts``, ``max_new_tokens``, ``with_base``, ``precision``."""
    return run_export(ExportRequest.of(adapter_dir, out, **options))


def run_export(request: ExportRequest) -> ExportResult:
    """Export and check as ``request`` says (see ``ExportRequest``, ``ParityOptions``).

    All or nothing: whether every check can run (its runtime importable, a GGUF base, the prompts) is decided
    before anything is written; the artifact is then written beside ``out``, checked there, and moved into
    place only when every check has run. On any error nothing is left at ``out`` (with ``overwrite``, what was
    there stays as it was). A check's figures are not judged here (``--min-agreement`` is the caller's).

    Raises:
        ValueError: an unknown format, layout, dtype or precision (or one the CPU lacks), a check that cannot
            run (its runtime missing) with ``required``, a check that cannot run for another reason, a model
            without a GGUF base where one is needed, an adapter that does not fit the base, an existing ``out``
            without ``overwrite``, everything the format's writer refuses (see ``gguf_lora_file``,
            ``export_gguf_model``, ``vllm_files``), and a check that fails.
    """
    fmt, options = request.fmt, request.parity
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    merged = _merged_layout(fmt, request.merged, request.ollama_layout)
    if options.required and not options.enabled:
        raise ValueError("--require-parity and --no-parity contradict each other: drop one")
    out = Path(request.out)
    unchecked = missing_runtime(fmt) if options.enabled else None
    if unchecked and options.required:
        raise ValueError(f"--require-parity: the parity check cannot run: {unchecked}; nothing was written")
    plan = None
    if options.enabled and not unchecked:
        precision = decide(options.precision, "cpu")
        plan = CheckPlan(options.prompts, options.max_prompts, options.max_new_tokens, options.with_base, precision)
    if fmt == "vllm":
        if request.dtype is not None:
            raise ValueError("--dtype does not apply to --format vllm: the adapter keeps the dtype it was saved in")
        check_target(out, request.overwrite, directory=True)
        require_runtimes(fmt, False, plan)
        return replace(_export_vllm(request, out, plan), unchecked=unchecked)
    dtype = request.dtype or ("f16" if merged else "f32")
    allowed = TYPES if merged else ("f32", "f16")
    if dtype not in allowed:
        raise ValueError(f"--dtype {dtype!r} is not available for --format {fmt}; use one of {', '.join(allowed)}")
    check_target(out, request.overwrite, directory=fmt == "ollama")
    needed_for = None if fmt == "gguf-lora" and plan is None else fmt
    base = _gguf_base(request.model, request.base_gguf, needed_for)
    require_runtimes(fmt, merged, plan)
    request = replace(request, dtype=dtype)
    if fmt == "gguf-lora":
        result = _export_gguf_lora(request, out, base, plan)
    elif fmt == "gguf":
        result = _export_gguf(request, out, base, plan)
    else:
        result = _export_ollama(request, out, base, merged, plan)
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


# ----- the one load, and the models built on it ------------------------------------------------------------
def _store_as(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with its floating-point parameters in ``dtype``, as ``load_model(dtype=...)`` would have
    loaded them (buffers keep their dtype, as they do in such a load: rotary tables stay float32)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    model.config.dtype = dtype
    return model


def _adapted(base: nn.Module, adapter_dir, precision: Precision, *, copied: bool) -> nn.Module:
    """lorakit's adapted model as it computes in ``precision``: the base in the precision's storage dtype, the
    adapter in its trained dtype (float32 under the mixed precisions, bf16 under pure bf16); built on a copy of
    ``base`` when ``copied`` (the export needs the base again), else on ``base`` itself."""
    model = _store_as(copy.deepcopy(base) if copied else base, precision.storage)
    return load_adapter(model, adapter_dir, adapter_dtype=precision.trained)


def _declared_stops(gguf: Path | None) -> frozenset[int]:
    """The stop ids the export's GGUF declares; none where there is no GGUF, or where its metadata cannot be
    read here (llama.cpp's own load of it then says what is wrong)."""
    try:
        return gguf_stop_ids(gguf) if gguf is not None else frozenset()
    except ValueError:
        return frozenset()


# ----- the formats ---------------------------------------------------------------------------------------------
def _export_gguf_lora(request: ExportRequest, out: Path, base: Path | None, plan: CheckPlan | None) -> ExportResult:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_dir(request.model))  # the config alone: no model load
    contents = gguf_lora_file(request.adapter_dir, config, dtype=request.dtype)
    checks = None if plan is None else _gguf_lora_checks(request, plan, base)[0]
    with staged_file(out, request.overwrite) as staged:
        artifact = contents.write(staged)
        reports = {} if checks is None else checked(lambda: checks(base, staged), staged, out)
    artifact = replace(artifact, path=out)
    return ExportResult(artifact, reports, run=f"llama-cli -m {base or 'BASE.gguf'} --lora {out}")


def _gguf_lora_checks(request: ExportRequest, plan: CheckPlan, base_gguf: Path | None) -> tuple[RunChecks, object]:
    """What the checks of a LoRA GGUF compare with (lorakit's adapted model, the base alone for ``with_base``,
    the prompts), from the export's one load, before the file is written; the function returned runs them on
    ``(base GGUF, adapter GGUF)``. Returns it with the tokenizer."""
    model, tokenizer = load_model(request.model)
    plain = _store_as(copy.deepcopy(model), plan.precision.storage) if plan.with_base else None
    adapted = _adapted(model, request.adapter_dir, plan.precision, copied=False)
    context = plan.bind(tokenizer, adapted, _declared_stops(base_gguf))

    def run(base: Path, adapter_file: Path) -> dict[str, ParityReport]:
        checks = {"adapter": llama_cpp_parity(adapted, context.examples, base, adapter_file, **context.ours())}
        if plain is not None:
            checks["base"] = llama_cpp_parity(plain, context.examples, base, None, **context.ours())
        return checks

    return run, tokenizer


def _export_gguf(request: ExportRequest, out: Path, base: Path, plan: CheckPlan | None) -> ExportResult:
    merged, checks, _ = _merged_and_checks(request, plan, base)
    with staged_file(out, request.overwrite) as staged:
        artifact = export_gguf_model(merged, base, staged, dtype=request.dtype)
        reports = {} if checks is None else checked(lambda: checks(staged), staged, out)
    return ExportResult(replace(artifact, path=out), reports, run=f"llama-cli -m {out} -cnv")


def _merged_and_checks(
    request: ExportRequest, plan: CheckPlan | None, base_gguf: Path
) -> tuple[nn.Module, RunChecks | None, object]:
    """The base with the adapter merged in float32 and the wrappers removed, from the export's one load; the
    checks of the merged GGUF written from it (None without a plan), and the tokenizer. lorakit's side of the
    checks is in fp32 the float32 merge itself (the same maths as the adapted model, to float32 rounding), in
    another precision the adapted model as it computes there, built on a copy of the base before the merge."""
    model, tokenizer = load_model(request.model)
    ours = None
    if plan is not None and plan.precision.storage != torch.float32:
        ours = _adapted(model, request.adapter_dir, plan.precision, copied=True)
    merged = unload(load_adapter(model, request.adapter_dir), merge=True)
    if plan is None:
        return merged, None, tokenizer
    ours = merged if ours is None else ours
    context = plan.bind(tokenizer, ours, _declared_stops(base_gguf))
    return merged, _gguf_checks(ours, context, request.dtype), tokenizer


def _gguf_checks(ours: nn.Module, context: CheckContext, dtype: str) -> RunChecks:
    """The checks of a merged GGUF ``file`` (written as ``dtype``): in llama.cpp and in transformers' GGUF
    loader, each against lorakit (``ours``), and against each other. The transformers reading computes in
    float32, so with lorakit in fp32 its distance to lorakit is the drift the file's rounding to ``dtype``
    causes."""
    import transformers
    from transformers import AutoModelForCausalLM

    def run(file: Path) -> dict[str, ParityReport]:
        checks = {"llama.cpp": llama_cpp_parity(ours, context.examples, file, None, **context.ours())}
        reread = quiet(
            lambda: AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        )
        label = f"transformers {transformers.__version__} GGUF loader ({dtype} weights, float32 products)"
        checks["transformers"] = model_parity(ours, context.examples, reread, label, **context.ours())
        checks["llama.cpp vs transformers"] = llama_cpp_parity(
            reread, context.examples, file, None, reference="transformers' GGUF loader", **context.decoding()
        )
        return checks

    return run


def _export_ollama(request: ExportRequest, out: Path, base: Path, merged: bool, plan: CheckPlan | None) -> ExportResult:
    """The Ollama directory, built and checked in a staged directory that replaces ``out`` once all is done."""
    if merged:
        model, checks, tokenizer = _merged_and_checks(request, plan, base)
        model_file, adapter_file = "model.gguf", None
    else:
        from transformers import AutoConfig, AutoTokenizer

        model_file, adapter_file = base.name, "adapter.gguf"
        directory = resolve_model_dir(request.model)
        contents = gguf_lora_file(request.adapter_dir, AutoConfig.from_pretrained(directory), dtype=request.dtype)
        if plan is None:
            checks, tokenizer = None, AutoTokenizer.from_pretrained(directory)  # no model load without checks
        else:
            checks, tokenizer = _gguf_lora_checks(request, plan, base)
    text, family, stops = modelfile(model_file, adapter_file, tokenizer)
    with staged_directory(out, request.overwrite) as tmp:
        if merged:
            written = export_gguf_model(model, base, tmp / model_file, dtype=request.dtype)
        else:
            written = contents.write(tmp / adapter_file)
            place(base, tmp / model_file)
        (tmp / MODELFILE).write_text(text)
        files = [tmp / name for name in (model_file, adapter_file) if name]  # what the checks run
        reports = {} if checks is None else checked(lambda: checks(*files), tmp, out)
    part = replace(written, path=out / written.path.name).describe()
    artifact = OllamaExport(out, model_file, adapter_file, family, stops, [part])
    return ExportResult(artifact, reports, run=artifact.command(out.name.lower().replace("_", "-") or "lorakit"))


def _export_vllm(request: ExportRequest, out: Path, plan: CheckPlan | None) -> ExportResult:
    """The vLLM directory, built and read back with PEFT in a staged directory that replaces ``out`` once the
    check has run."""
    files = vllm_files(request.adapter_dir)
    checks = None if plan is None else _vllm_checks(request, plan)
    with staged_directory(out, request.overwrite) as tmp:
        files.write(tmp)
        reports = {} if checks is None else checked(lambda: checks(tmp), tmp, out)
    artifact = files.result(out)
    return ExportResult(artifact, reports, run=artifact.command(out.name))


def _vllm_checks(request: ExportRequest, plan: CheckPlan) -> RunChecks:
    """lorakit's adapted model (on a copy of the base), the base for PEFT (float32, as it is read) and the
    prompts, from the export's one load, before the directory is written; the function returned reads a
    written ``directory`` with PEFT (as vLLM reads it) and compares."""
    peft = require_peft()
    base, tokenizer = load_model(request.model)
    adapted = _adapted(base, request.adapter_dir, plan.precision, copied=True)
    context = plan.bind(tokenizer, adapted, _declared_stops(gguf_source(request.model)))

    def run(directory: Path) -> dict[str, ParityReport]:
        reread = peft.PeftModel.from_pretrained(base, str(directory))
        label = f"PEFT {peft.__version__} (vLLM's reading of the file: one scaling for every layer)"
        return {"peft": model_parity(adapted, context.examples, reread, label, **context.ours())}

    return run


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
