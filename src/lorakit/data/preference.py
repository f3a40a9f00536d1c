"""Preference rows (``objective: dpo | orpo``): ``{"prompt", "chosen", "rejected"}``, as strings, or as chat: the
prompt a list of messages ending with the user's turn, chosen and rejected the assistant's answer (a string
or a list holding one assistant message). Each becomes a ``PreferencePair``: two sequences sharing the prompt,
labelled on the answer tokens only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from .batching import collate
from .sft import IGNORE, DataStats, Example, _check_messages, _tokenize_chat, row_fields, tokenize_row


@dataclass
class PreferencePair:
    """One preference row: two sequences with the same prompt tokens, labelled on their answers only.
    ``reference``: the reference model's log-probabilities of (chosen, rejected), once computed."""

    chosen: Example
    rejected: Example
    reference: tuple[float, float] | None = None


def tokenize_pair(row: dict[str, Any], where: str, tokenizer, max_length: int) -> tuple[PreferencePair, str, bool]:
    """(pair, kind, truncated) of a preference row. Too long: the prompt loses its beginning and the answers
    their ends, keeping at least half of ``max_length`` for the answers. Errors name ``where`` and the fix."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(
            f"{where}: preference rows need 'prompt', 'chosen' and 'rejected'; missing {missing}, got {row_fields(row)}. "
            "(Rows of text, prompt/completion or messages train with objective: sft.)"
        )
    prompt, chosen, rejected = (_maybe_messages(row[k]) for k in ("prompt", "chosen", "rejected"))
    if any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        kind = "chat"
        sides = [
            _chat_side(prompt, answer, where, name, tokenizer)
            for name, answer in (("chosen", chosen), ("rejected", rejected))
        ]
    else:
        kind = "prompt"
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise ValueError(
                    f"{where}: '{name}' must be a string or a list of messages, got {type(value).__name__}"
                )
        sides = [
            tokenize_row({"prompt": prompt, "completion": answer}, where, tokenizer, True)[0]
            for answer in (chosen, rejected)
        ]
    c, r = sides
    if c.input_ids == r.input_ids:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same answer; a pair needs two different answers")
    start = c.answer_start
    if c.input_ids[:start] != r.input_ids[:start] or r.answer_start != start:
        raise ValueError(f"{where}: the chat template renders the prompt differently before each answer")
    answer_room = max(max_length - start, max_length // 2)
    keep = [min(len(e.input_ids) - start, answer_room) for e in sides]
    cut = max(0, start - (max_length - max(keep)))  # prompt tokens dropped from the left
    truncated = cut > 0 or any(k < len(e.input_ids) - start for k, e in zip(keep, sides, strict=True))
    pair = PreferencePair(*(_cut(e, cut, start + k) for e, k in zip(sides, keep, strict=True)))
    return pair, kind, truncated


def _maybe_messages(value: Any) -> Any:
    """CSV cells and Parquet strings may hold a JSON list of messages."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
    return value


def _chat_side(prompt: Any, answer: Any, where: str, name: str, tokenizer) -> Example:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    _check_messages(messages, f"{where}: 'prompt'")
    if messages[-1]["role"] == "assistant":
        raise ValueError(
            f"{where}: the prompt ends with an assistant turn; it should end with the turn the answer replies to"
        )
    if isinstance(answer, str):
        answer = [{"role": "assistant", "content": answer}]
    if not (
        isinstance(answer, list)
        and len(answer) == 1
        and isinstance(answer[0], dict)
        and answer[0].get("role") == "assistant"
        and isinstance(answer[0].get("content"), str)
    ):
        raise ValueError(
            f"{where}: '{name}' must be a string or a list with one {{'role': 'assistant', 'content': ...}} message, got {answer!r}"
        )
    example = _tokenize_chat(messages + answer, where, tokenizer, completion_only=True)
    start = example.answer_start
    example.labels = [IGNORE] * start + example.labels[start:]  # earlier assistant turns are prompt here
    return example


def _cut(example: Example, left: int, end: int) -> Example:
    """``example`` without its first ``left`` tokens and everything from ``end`` on."""
    start = example.answer_start - left
    return Example(
        example.input_ids[left:end], example.labels[left:end], start,
        min(example.answer_end, end) - left, example.reference,
    )  # fmt: skip


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch: the chosen sequences of ``pairs``, then their rejected ones."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def tokenize_pairs(
    rows: list[tuple[str, dict[str, Any]]], tokenizer, max_length: int
) -> tuple[list[PreferencePair], DataStats]:
    """Every preference row as a pair (see ``tokenize_pair``); statistics count both answers' tokens."""
    pairs, stats = [], DataStats()
    for where, row in rows:
        pair, kind, truncated = tokenize_pair(row, where, tokenizer, max_length)
        stats.count(kind, [pair.chosen, pair.rejected], truncated)
        pairs.append(pair)
    return pairs, stats
