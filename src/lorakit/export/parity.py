"""Parity of an exported artifact, measured by an implementation other than lorakit's: llama.cpp.

For each prompt, lorakit's own adapted model and llama.cpp (through ``llama-cpp-python``, with the adapter
over the base GGUF) decode greedily from the same token ids. The report gives:

- greedy-token agreement: along lorakit's greedy continuation, the share of positions where llama.cpp, fed
  the same tokens (teacher-forced), picks the same next token;
- the largest logit difference along those positions;
- the share of prompts whose free-running continuations are identical (stricter: one flipped token early on
  sends two greedy decoders down different paths);
- for rows with a reference answer, each side's exact match by lorakit's own criterion (the answer's tokens,
  end-of-turn included, reproduced greedily).

llama.cpp computes quantized products (a Q4_1 base multiplies 8-bit-quantized activations), lorakit float32
ones on the same dequantized weights, so the base model alone already differs by about 2 logits on the
embedded model: compare an export's figures with ``--with-base``'s. lorakit's side computes in float32 unless
a ``precision`` is given (``lorakit export --precision``): its forwards then run in that precision's autocast,
and the report names it ("vs lorakit (bf16-mixed)").
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data import Example
from ..models import kv_cache_inputs, kv_cache_output
from ..precision import Precision
from ..stopping import gguf_stop_ids


@dataclass
class ParityReport:
    runtime: str
    prompts: int
    agreement: float  # share of lorakit's greedy tokens llama.cpp also picks, teacher-forced on lorakit's tokens
    max_logit_diff: float  # largest |logit difference| along lorakit's continuations
    sequence_agreement: float  # share of prompts whose free-running greedy continuations are identical
    tokens: int = 0  # positions compared
    exact_lorakit: float | None = None  # exact match on rows with a reference answer
    exact_runtime: float | None = None
    scored: int = 0
    reference: str = "lorakit"  # the side the runtime is compared with

    def describe(self) -> str:
        text = (
            f"{self.runtime} vs {self.reference}, {self.prompts} prompts: greedy-token agreement "
            f"{100 * self.agreement:.1f}% of {self.tokens} tokens, largest logit difference {self.max_logit_diff:.3g}, "
            f"identical continuations {100 * self.sequence_agreement:.1f}%"
        )
        if self.exact_runtime is not None:
            text += (
                f"; exact match on {self.scored} answers {100 * self.exact_runtime:.1f}% vs "
                f"{100 * self.exact_lorakit:.1f}%"
            )
        return text

    def as_record(self) -> dict:
        return dict(self.__dict__)


LLAMA_CPP_INSTALL = (
    'pip install llama-cpp-python, or CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python on CPUs where the '
    "native build crashes"
)
PEFT_INSTALL = "pip install peft"


def _import_llama_cpp():
    """The llama_cpp module (llama-cpp-python), imported here so that tests can replace the import."""
    import llama_cpp

    return llama_cpp


def _import_peft():
    """The peft module, imported here so that tests can replace the import."""
    import peft

    return peft


# format: (the package its check runs in, its module, the import, how to install it)
_RUNTIMES = {
    "gguf": ("llama-cpp-python", "llama_cpp", _import_llama_cpp, LLAMA_CPP_INSTALL),
    "vllm": ("peft", "peft", _import_peft, PEFT_INSTALL),
}


def missing_runtime(fmt: str) -> str | None:
    """Why the parity check of an export as ``fmt`` cannot run here, with the way to install what it runs in
    (llama-cpp-python for the GGUF formats, PEFT for vLLM), as one clause; None when it can run."""
    package, module, load, install = _RUNTIMES["vllm" if fmt == "vllm" else "gguf"]
    try:
        load()
    except Exception as err:  # also OSError / RuntimeError from a build whose library fails to load
        if isinstance(err, ModuleNotFoundError) and err.name == module:
            return f"{package} is not installed ({install})"
        detail = " ".join(str(err).split()) or type(err).__name__
        return f"{package} cannot be loaded ({detail}; {install})"
    return None


def require_llama_cpp():
    """The llama_cpp module, or a ValueError saying how to install it. Called before an export writes anything,
    so that a check that cannot run stops the command before there is a file to clean up."""
    try:
        return _import_llama_cpp()
    except Exception as err:  # ImportError, or OSError / RuntimeError from a build whose library fails to load
        raise ValueError(
            f"the parity check runs the export in llama.cpp through llama-cpp-python, which cannot be imported "
            f"({err}). Install it ({LLAMA_CPP_INSTALL}), or pass --no-parity"
        ) from None


def require_peft():
    """The peft module (the vLLM export's check reads the directory with PEFT), or a ValueError saying how to
    install it."""
    try:
        return _import_peft()
    except Exception as err:
        raise ValueError(
            f"the vLLM export's check reads it with PEFT, which cannot be imported ({err}): {PEFT_INSTALL}, or "
            "pass --no-parity"
        ) from None


def require_transformers_gguf() -> None:
    """transformers' GGUF loader (a check of a merged GGUF reads the file back with it) must be usable: it
    needs the gguf package at transformers' minimum version, and accelerate."""
    from transformers.utils import import_utils

    missing = []
    if not import_utils.is_gguf_available():
        missing.append(f"gguf>={getattr(import_utils, 'GGUF_MIN_VERSION', '0.10.0')}")
    if not import_utils.is_accelerate_available():
        missing.append("accelerate")
    if missing:
        raise ValueError(
            "the merged GGUF's check reads the file back with transformers' GGUF loader, which needs "
            f"{' and '.join(missing)}: pip install -U {' '.join(repr(m) for m in missing)}, or pass --no-parity"
        )


def llama_cpp_parity(
    model: nn.Module,
    examples: list[Example],
    base_gguf: str | os.PathLike,
    adapter_gguf: str | os.PathLike | None,
    *,
    stop_ids: AbstractSet[int],
    max_new_tokens: int = 16,
    threads: int | None = None,
    reference: str = "lorakit",
    precision: Precision | None = None,
) -> ParityReport:
    """Decode ``examples``' prompts greedily in ``model`` (lorakit's adapted model, or ``reference``) and in
    llama.cpp (``base_gguf`` with ``adapter_gguf``, or alone when None) and compare; see the module docstring.
    ``model`` computes in ``precision`` (None: as it is stored). Both sides stop at ``stop_ids`` (the one policy
    of ``lorakit.stopping``, which the export gives with its GGUF's declared ids) and llama.cpp also at the ids
    the file it runs declares (``llama_cpp_stop_ids``), which the policy includes for the same file."""
    llama_cpp = require_llama_cpp()
    longest = max(len(e.prompt_ids) for e in examples) + max_new_tokens + 1
    llm = llama_cpp.Llama(
        model_path=str(base_gguf),
        lora_path=None if adapter_gguf is None else str(adapter_gguf),
        n_ctx=max(64, longest),
        n_threads=threads or os.cpu_count(),
        logits_all=True,
        verbose=False,
    )
    llama_stops = frozenset(stop_ids) | llama_cpp_stop_ids(llm)
    try:
        return compare(
            model, examples, f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            theirs=lambda prompt, steps: _llama_greedy(llm, prompt, steps, llama_stops),
            forced=lambda prompt, ours, logits: _teacher_forced(llm, prompt, ours, logits),
            stop_ids=stop_ids, max_new_tokens=max_new_tokens, reference=reference, precision=precision,
        )  # fmt: skip
    finally:
        llm.close()


def compare(
    model: nn.Module,
    examples: list[Example],
    runtime: str,
    *,
    theirs: Callable[[list[int], int], list[int]],
    forced: Callable[[list[int], list[int], list[np.ndarray]], tuple[float, int]],
    stop_ids: AbstractSet[int],
    max_new_tokens: int,
    reference: str = "lorakit",
    precision: Precision | None = None,
) -> ParityReport:
    """The report for one runtime: ``theirs(prompt, steps)`` its free-running greedy tokens, ``forced(prompt,
    ours, our_logits)`` its largest logit gap and argmax hits fed ``model``'s own continuation, which ``model``
    computes in ``precision`` (None: as it is stored; a precision other than fp32 is named in the report)."""
    from tqdm.auto import tqdm

    if precision is not None and precision.name != "fp32":
        reference = f"{reference} ({precision.name})"
    same = matched = compared = exact_ours = exact_theirs = scored = 0
    worst = 0.0
    model.eval()
    progress = tqdm(examples, desc=f"checking: {runtime} vs {reference}", unit="prompt", leave=False, file=sys.stderr)
    for example in progress:
        prompt = example.prompt_ids
        answer = example.input_ids[example.answer_start : example.answer_end] if example.reference else None
        steps = len(answer) if answer else max_new_tokens
        with precision.context("cpu") if precision else contextlib.nullcontext():
            ours, our_logits = _greedy(model, prompt, steps, stop_ids)
        their_tokens = theirs(prompt, steps)
        same += ours == their_tokens
        gap, hits = forced(prompt, ours, our_logits)
        worst, matched, compared = max(worst, gap), matched + hits, compared + len(ours)
        if answer:
            scored += 1
            exact_ours += ours == answer
            exact_theirs += their_tokens == answer
    report = ParityReport(
        runtime, len(examples), matched / compared, worst, same / len(examples), compared, scored=scored,
        reference=reference,
    )  # fmt: skip
    if scored:
        report.exact_lorakit, report.exact_runtime = exact_ours / scored, exact_theirs / scored
    return report


@torch.no_grad()
def _greedy(model: nn.Module, prompt: list[int], steps: int, stop_ids: AbstractSet[int]):
    """Greedy tokens of a transformers-style causal LM (lorakit's, or PEFT's reading of an export), up to and
    including a stop token, and the logits that chose each of them."""
    ids = torch.tensor([prompt])
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    past = None
    for _ in range(steps):
        out = model(input_ids=ids, use_cache=True, **kv_cache_inputs(model, past))
        past = kv_cache_output(out)
        row = out.logits[0, -1].float()
        logits.append(row.numpy())
        token = int(row.argmax())
        tokens.append(token)
        if token in stop_ids:
            break
        ids = torch.tensor([[token]])
    return tokens, logits


def llama_cpp_stop_ids(llm) -> frozenset[int]:
    """The tokens llama.cpp ends a generation at, as the GGUF's metadata declares them (EOS, end of turn, end
    of message: ``lorakit.stopping.gguf_stop_ids``)."""
    return frozenset({int(llm.token_eos())}) | gguf_stop_ids(llm.metadata)


def _llama_greedy(llm, prompt: list[int], steps: int, stop_ids: AbstractSet[int]) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    tokens: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        if token in stop_ids:
            break
        llm.eval([token])
    return tokens


def _teacher_forced(llm, prompt: list[int], tokens: list[int], ours: list[np.ndarray]) -> tuple[float, int]:
    """llama.cpp fed lorakit's own continuation: the largest |logit difference| and how many of lorakit's
    tokens llama.cpp's argmax picks too."""
    llm.reset()
    llm.eval(prompt + tokens[:-1])
    start = len(prompt) - 1
    theirs = llm.scores[start : start + len(tokens)]
    gap = max(float(np.abs(theirs[i] - ours[i]).max()) for i in range(len(tokens)))
    return gap, sum(int(np.argmax(theirs[i])) == token for i, token in enumerate(tokens))


def model_parity(
    model: nn.Module,
    examples: list[Example],
    other: nn.Module,
    runtime: str,
    *,
    stop_ids: AbstractSet[int],
    max_new_tokens: int = 16,
    precision: Precision | None = None,
) -> ParityReport:
    """Decode ``examples`` greedily in lorakit (``model``, computing in ``precision``; None: as it is stored)
    and in ``other``, another implementation's reading of the export (PEFT for a vLLM directory, transformers'
    GGUF loader for a GGUF file), which computes as it is stored, and compare."""
    other.eval()

    @torch.no_grad()
    def forced(prompt, ours, our_logits):
        logits = other(input_ids=torch.tensor([prompt + ours[:-1]])).logits[0, len(prompt) - 1 :].float().numpy()
        gap = max(float(np.abs(logits[i] - our_logits[i]).max()) for i in range(len(ours)))
        return gap, sum(int(np.argmax(logits[i])) == token for i, token in enumerate(ours))

    return compare(
        model, examples, runtime,
        theirs=lambda prompt, steps: _greedy(other, prompt, steps, stop_ids)[0],
        forced=forced, stop_ids=stop_ids, max_new_tokens=max_new_tokens, precision=precision,
    )  # fmt: skip
