"""What the parity checks of one export share: the plan (prompts, token budget, precision), the prompts as
examples, the stop tokens (``lorakit.stopping``, the policy evaluation and the server use), the runtimes they
need, and the one error line a failing check ends an export with. The checks themselves are in ``parity``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..data import Example, chat_prompt_ids, read_rows, tokenize_row
from ..precision import Precision
from ..stopping import stop_token_ids
from .parity import ParityReport, require_llama_cpp, require_peft, require_transformers_gguf

# Chat prompts for the parity check when no --prompts file is given.
BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Write the date May 3rd, 1999 as YYYY-MM-DD.",
    "Name three colours.",
    "Explain LoRA in one sentence.",
    "What is 12 plus 30?",
    "Translate 'good morning' into French.",
)


@dataclass(frozen=True)
class CheckPlan:
    """The parity checks asked for: which prompts, how many tokens, whether to check the base alone too, and
    the precision lorakit's side computes in."""

    prompts: str | os.PathLike | None
    max_prompts: int
    max_new_tokens: int
    with_base: bool
    precision: Precision

    def bind(self, tokenizer, model, gguf_ids: Iterable[int] = ()) -> CheckContext:
        """The context every report of the export uses: the prompts read with ``tokenizer``, and the stop tokens
        of ``model`` by the one policy (with the ids the export's GGUF declares)."""
        examples = parity_examples(tokenizer, self.prompts, self.max_prompts)
        stops = stop_token_ids(tokenizer, model, gguf_ids)
        return CheckContext(examples, stops, self.max_new_tokens, self.with_base, self.precision)


@dataclass(frozen=True)
class CheckContext:
    """What every parity report of one export uses: the prompts, the stop tokens and lorakit's precision."""

    examples: list[Example]
    stop_ids: frozenset[int]
    max_new_tokens: int
    with_base: bool = False
    precision: Precision | None = None

    def decoding(self) -> dict:
        """The keywords of a report whose reference side is another runtime (``reference=``)."""
        return {"stop_ids": self.stop_ids, "max_new_tokens": self.max_new_tokens}

    def ours(self) -> dict:
        """``decoding`` for a report whose reference side is lorakit's model, which computes in the precision."""
        return {**self.decoding(), "precision": self.precision}


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


def require_runtimes(fmt: str, merged: bool, plan: CheckPlan | None) -> None:
    """Every runtime the export's checks run in must be there (``plan``: the checks that will run; a missing
    llama-cpp-python or PEFT has already made it None, or an error under ``require_parity``): decided before
    anything is written, so that a check that cannot run stops the command with the fix (install it, or
    --no-parity) and no file to remove."""
    if plan is None:
        return
    if fmt == "vllm":
        require_peft()
        return
    require_llama_cpp()
    if merged:
        require_transformers_gguf()


def checked(run: Callable[[], dict[str, ParityReport]], staged: Path, out: Path) -> dict[str, ParityReport]:
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


def quiet(load):
    """Run a transformers loader without its warnings (its progress bar stays: the GGUF dequantizes slowly)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load()
    finally:
        hf_logging.set_verbosity(verbosity)
