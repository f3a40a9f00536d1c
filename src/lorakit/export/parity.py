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
embedded model: compare an export's figures with ``--with-base``'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data import Example


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

    def describe(self) -> str:
        text = (
            f"parity with {self.runtime} on {self.prompts} prompts: greedy-token agreement {100 * self.agreement:.1f}% "
            f"of {self.tokens} tokens, largest logit difference {self.max_logit_diff:.3g}, identical continuations "
            f"{100 * self.sequence_agreement:.1f}%"
        )
        if self.exact_runtime is not None:
            text += (
                f"; exact match on {self.scored} answers: {self.runtime} {100 * self.exact_runtime:.1f}%, "
                f"lorakit {100 * self.exact_lorakit:.1f}%"
            )
        return text

    def as_record(self) -> dict:
        return dict(self.__dict__)


def require_llama_cpp():
    """The llama_cpp module, or a ValueError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ValueError(
            f"the parity check runs the export in llama.cpp through llama-cpp-python, which is not installed "
            f'({err}). Install it with CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python (it compiles '
            "from source, a few minutes), or pass --no-parity"
        ) from None
    return llama_cpp


def llama_cpp_parity(
    model: nn.Module,
    examples: list[Example],
    base_gguf: str | os.PathLike,
    adapter_gguf: str | os.PathLike | None,
    *,
    stop_ids: set[int],
    max_new_tokens: int = 16,
    threads: int | None = None,
) -> ParityReport:
    """Decode ``examples``' prompts greedily in lorakit (``model``, adapter applied) and in llama.cpp
    (``base_gguf`` with ``adapter_gguf``, or alone when None) and compare; see the module docstring."""
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
    same = matched = compared = exact_ours = exact_theirs = scored = 0
    worst = 0.0
    model.eval()
    for example in examples:
        prompt = example.prompt_ids
        answer = example.input_ids[example.answer_start : example.answer_end] if example.reference else None
        steps = len(answer) if answer else max_new_tokens
        ours, our_logits = _greedy(model, prompt, steps, stop_ids)
        theirs = _llama_greedy(llm, prompt, steps, stop_ids)
        same += ours == theirs
        gap, hits = _teacher_forced(llm, prompt, ours, our_logits)
        worst, matched, compared = max(worst, gap), matched + hits, compared + len(ours)
        if answer:
            scored += 1
            exact_ours += ours == answer
            exact_theirs += theirs == answer
    runtime = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
    report = ParityReport(
        runtime, len(examples), matched / compared, worst, same / len(examples), compared, scored=scored
    )
    if scored:
        report.exact_lorakit, report.exact_runtime = exact_ours / scored, exact_theirs / scored
    llm.close()
    return report


@torch.no_grad()
def _greedy(model: nn.Module, prompt: list[int], steps: int, stop_ids: set[int]):
    """Greedy tokens of a transformers-style causal LM (lorakit's, or PEFT's reading of an export), up to and
    including a stop token, and the logits that chose each of them."""
    ids = torch.tensor([prompt])
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    past = None
    for _ in range(steps):
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        row = out.logits[0, -1].float()
        logits.append(row.numpy())
        token = int(row.argmax())
        tokens.append(token)
        if token in stop_ids:
            break
        ids = torch.tensor([[token]])
    return tokens, logits


def _llama_greedy(llm, prompt: list[int], steps: int, stop_ids: set[int]) -> list[int]:
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


def peft_parity(
    model: nn.Module, examples: list[Example], reference: nn.Module, *, stop_ids: set[int], max_new_tokens: int = 16
) -> ParityReport:
    """Decode ``examples`` greedily in lorakit (``model``) and in ``reference`` (a PEFT model over the same base
    with the exported adapter: PEFT reads the file as vLLM does, one scaling for every layer) and compare."""
    import peft

    same = matched = compared = 0
    worst = 0.0
    model.eval()
    reference.eval()
    for example in examples:
        prompt = example.prompt_ids
        ours, our_logits = _greedy(model, prompt, max_new_tokens, stop_ids)
        theirs, _ = _greedy(reference, prompt, max_new_tokens, stop_ids)
        same += ours == theirs
        with torch.no_grad():
            forced = reference(input_ids=torch.tensor([prompt + ours[:-1]])).logits[0, len(prompt) - 1 :].float()
        worst = max(worst, max(float(np.abs(forced[i].numpy() - our_logits[i]).max()) for i in range(len(ours))))
        matched += sum(int(forced[i].argmax()) == token for i, token in enumerate(ours))
        compared += len(ours)
    runtime = f"PEFT {peft.__version__} (vLLM's reading of the file: one scaling for every layer)"
    return ParityReport(runtime, len(examples), matched / compared, worst, same / len(examples), compared)
