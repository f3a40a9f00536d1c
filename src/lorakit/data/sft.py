"""Tokenizing rows for supervised fine-tuning (SFT), labelling completions, and the statistics of a tokenized set.

Row formats (one per row, detected by its fields):
- ``{"text": ...}``: plain language modelling, loss on every token;
- ``{"prompt": ..., "completion": ...}``: loss on the completion only (unless ``completion_only: false``);
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template,
  loss on the assistant turns only.
Rows whose last part is a completion / assistant turn also serve exact-match evaluation: the prompt is
generated from and the answer compared with the reference.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..stopping import stop_token_ids

IGNORE = -100  # label of tokens that carry no loss
_ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class Example:
    """One tokenized row. Rows ending in an answer record where it sits, for exact-match evaluation:
    ``input_ids[:answer_start]`` is the prompt and ``input_ids[answer_start:answer_end]`` the answer's
    tokens up to and including the end-of-turn token that stops generation."""

    input_ids: list[int]
    labels: list[int]
    answer_start: int | None = None
    answer_end: int | None = None
    reference: str | None = None  # the expected answer text
    segments: list[int] | None = None  # packed rows: the length of each row, in order (see ``pack``)

    @property
    def prompt_ids(self) -> list[int] | None:
        return None if self.answer_start is None else self.input_ids[: self.answer_start]

    @property
    def scorable(self) -> bool:
        return self.answer_end is not None and self.answer_end <= len(self.labels)


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str, examples: list[Example], truncated: bool) -> None:
        """Count one row of ``kind`` tokenized as ``examples`` (one, or a preference pair's two answers)."""
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.rows += 1
        self.truncated += bool(truncated)
        for example in examples:
            self.tokens += len(example.input_ids)
            self.trained_tokens += sum(label != IGNORE for label in example.labels)

    def describe(self, name: str) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        trunc = f"; {self.truncated} truncated to max_length" if self.truncated else ""
        return f"{name}: {self.rows} rows ({kinds}), {self.tokens} tokens, {self.trained_tokens} with loss{trunc}"


def row_kind(row: dict[str, Any], where: str) -> str:
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        missing = [k for k in ("prompt", "completion") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{where}: prompt/completion rows need string fields {missing}; got {row_fields(row)}")
        return "prompt"
    if isinstance(row.get("text"), str):
        return "text"
    raise ValueError(
        f"{where}: a row needs 'text', or 'prompt' and 'completion', or 'messages'; it has {row_fields(row)}"
    )


def row_fields(row: dict[str, Any]) -> str:
    """A row's fields and their types, for error messages: ``prompt (str), label (int)``."""
    return ", ".join(f"{k} ({type(v).__name__})" for k, v in row.items()) or "no fields"


def tokenize_row(row: dict[str, Any], where: str, tokenizer, completion_only: bool) -> tuple[Example, str]:
    kind = row_kind(row, where)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if kind == "text":
        ids = tokenizer(row["text"])["input_ids"] + eos
        return Example(ids, list(ids)), kind
    if kind == "prompt":
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
        labels = ([IGNORE] * len(prompt) if completion_only else list(prompt)) + answer
        end = len(prompt) + len(answer)
        return Example(prompt + answer, labels, len(prompt), end, reference=row["completion"]), kind
    return _tokenize_chat(row["messages"], where, tokenizer, completion_only), kind


def _tokenize_chat(messages: Any, where: str, tokenizer, completion_only: bool) -> Example:
    if isinstance(messages, str):  # CSV cells hold JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: 'messages' is a string but not a JSON list of messages") from None
    _check_messages(messages, where)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat rows need a tokenizer with a chat template; use prompt/completion rows")
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    last_answer = (0, 0)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not before.startswith(rendered) or not through.startswith(before):
            raise ValueError(f"{where}: this chat template does not render turn by turn; use prompt/completion rows")
        context = _encode(tokenizer, before[len(rendered) :])
        answer = _encode(tokenizer, through[len(before) :])
        ids += context + answer
        labels += ([IGNORE] * len(context) if completion_only else context) + answer
        last_answer = (len(ids) - len(answer), len(ids) - len(answer) + _through_stop(answer, tokenizer))
        rendered = through
    rest = _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=False)[len(rendered) :])
    ids += rest
    labels += [IGNORE] * len(rest) if completion_only else rest
    example = Example(ids, labels)
    if messages[-1]["role"] == "assistant":
        example.answer_start, example.answer_end = last_answer
        example.reference = messages[-1]["content"]
    return example


def tokenize_chat(messages: Any, where: str, tokenizer, completion_only: bool) -> Example:
    """A chat row (``messages``: a list, or JSON text of one) as an Example; see the module docstring."""
    return _tokenize_chat(messages, where, tokenizer, completion_only)


def _through_stop(answer: list[int], tokenizer) -> int:
    """Length of the answer up to and including its first stop token (``lorakit.stopping``: the one policy of
    evaluation, export checks and the server; generation stops there)."""
    stops = _stops(tokenizer)
    return next((i + 1 for i, token in enumerate(answer) if token in stops), len(answer))


_STOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stops(tokenizer) -> frozenset[int]:
    """``stop_token_ids(tokenizer)``, worked out once per tokenizer (it renders a probe chat)."""
    try:
        return _STOPS[tokenizer]
    except KeyError:
        ids = _STOPS[tokenizer] = stop_token_ids(tokenizer)
        return ids
    except TypeError:  # not weakly referenceable
        return stop_token_ids(tokenizer)


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"{where}: messages[{k}] must be {{'role': one of {sorted(_ROLES)}, 'content': a string}}, got {m!r}"
            )


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template with the assistant turn opened (what a model
    answers from); the template's own special tokens only, none added by the tokenizer."""
    return _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_rows(
    rows: list[tuple[str, dict[str, Any]]], tokenizer, max_length: int, completion_only: bool, tokenize=None
) -> tuple[list[Example], DataStats]:
    """Tokenize every row (with ``tokenize(row, where)``, default: causal LM rows); rows longer than
    ``max_length`` are truncated and counted."""
    examples, stats = [], DataStats()
    for where, row in rows:
        if tokenize is None:
            example, kind = tokenize_row(row, where, tokenizer, completion_only)
        else:
            example, kind = tokenize(row, where)
        truncated = max(len(example.input_ids), len(example.labels)) > max_length
        if truncated:
            example.input_ids = example.input_ids[:max_length]
            example.labels = example.labels[:max_length]
        stats.count(kind, [example], truncated)
        examples.append(example)
    return examples, stats
