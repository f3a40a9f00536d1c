"""Training data: read JSONL / CSV / Parquet / saved `datasets`, tokenize rows, label completions, batch.

Row formats (one per row, detected by its fields):
- ``{"text": ...}``: plain language modelling, loss on every token;
- ``{"prompt": ..., "completion": ...}``: loss on the completion only (unless ``completion_only: false``);
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template,
  loss on the assistant turns only.
Rows whose last part is a completion / assistant turn also serve exact-match evaluation: the prompt is
generated from and the answer compared with the reference.

Preference rows (``objective: dpo | orpo``): ``{"prompt", "chosen", "rejected"}``, as strings, or as chat: the
prompt a list of messages ending with the user's turn, chosen and rejected the assistant's answer (a string
or a list holding one assistant message). Each becomes a ``PreferencePair``: two sequences sharing the prompt,
labelled on the answer tokens only.
"""

from __future__ import annotations

import bisect
import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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

    def describe(self, name: str) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        trunc = f"; {self.truncated} truncated to max_length" if self.truncated else ""
        return f"{name}: {self.rows} rows ({kinds}), {self.tokens} tokens, {self.trained_tokens} with loss{trunc}"


# ----- reading -----------------------------------------------------------------------------------------
def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) pairs from a data file or a saved Hugging Face dataset; errors name the location."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file {path} does not exist")
    if path.is_dir():
        rows = _read_saved_dataset(path)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".csv":
        rows = _read_csv(path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise ValueError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .csv, .parquet or a saved dataset")
    if not rows:
        raise ValueError(f"{path} holds no rows; a dataset needs at least one")
    return rows


MAX_ROW_BYTES = 16 << 20
"""Largest row accepted (16 MiB): far beyond any max_length, small enough that one bad line cannot exhaust memory."""


def _too_long(where: str) -> ValueError:
    return ValueError(
        f"{where}: the row is longer than {MAX_ROW_BYTES:,} bytes, the limit for one row; split the text into "
        "several rows (training truncates each row to data.max_length tokens anyway)"
    )


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with open(path, "rb") as f:
        # readline with a limit: a file without newlines is never read whole into memory
        for number, raw in enumerate(iter(lambda: f.readline(MAX_ROW_BYTES + 1), b""), start=1):
            where = f"{path}:{number}"
            if len(raw) > MAX_ROW_BYTES:
                raise _too_long(where)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    return rows


def _read_csv(path: Path) -> list[tuple[str, dict[str, Any]]]:
    csv.field_size_limit(MAX_ROW_BYTES)  # the default, 128 KiB, is shorter than some real documents
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                rows.append((f"{path}:{reader.line_num}", dict(row)))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        if "field larger than field limit" in str(err):
            raise _too_long(f"{path}:{reader.line_num + 1}") from None
        raise ValueError(f"{path}: malformed CSV ({err})") from None
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several error types for damaged files
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError and its own errors
        raise ValueError(f"{path}: not a dataset saved with Dataset.save_to_disk ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"{path} holds several splits ({', '.join(loaded)}); point at one, e.g. {path}/train")
    return [(f"{path} row {i}", row) for i, row in enumerate(loaded)]


# ----- tokenizing -------------------------------------------------------------------------------------
def row_kind(row: dict[str, Any], where: str) -> str:
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        missing = [k for k in ("prompt", "completion") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{where}: prompt/completion rows need string fields {missing}; got {_keys(row)}")
        return "prompt"
    if isinstance(row.get("text"), str):
        return "text"
    raise ValueError(f"{where}: a row needs 'text', or 'prompt' and 'completion', or 'messages'; it has {_keys(row)}")


def _keys(row: dict[str, Any]) -> str:
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
    """Length of the answer up to and including the end-of-turn token (generation stops there)."""
    eos = tokenizer.eos_token_id
    return answer.index(eos) + 1 if eos in answer else len(answer)


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
        stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
        if max(len(example.input_ids), len(example.labels)) > max_length:
            example.input_ids = example.input_ids[:max_length]
            example.labels = example.labels[:max_length]
            stats.truncated += 1
        stats.rows += 1
        stats.tokens += len(example.input_ids)
        stats.trained_tokens += sum(label != IGNORE for label in example.labels)
        examples.append(example)
    return examples, stats


PACKING_STRATEGIES = ("bfd", "in_order")


def pack(examples: list[Example], max_length: int, strategy: str = "bfd") -> list[Example]:
    """Rows placed whole into sequences of at most ``max_length`` tokens (rows are already at most that long).

    ``bfd`` (best-fit decreasing, as TRL's default): the rows, longest first, each into the fullest sequence
    it still fits, a new one when none has room: sequences come out nearly full. ``in_order``: one after
    another in the data's order, a row that does not fit starting the next sequence.

    Each packed Example records its rows' lengths in ``segments``: ``collate`` then restarts the position ids
    at every row and builds a block-diagonal causal mask, so no token attends across rows. The first token of
    every row carries no label (unpacked, nothing predicts it either), so a packed batch gives the same loss
    and gradients as its rows run one by one.
    """
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"packing strategy {strategy!r}: use one of {list(PACKING_STRATEGIES)}")
    if strategy == "in_order":
        bins: list[list[int]] = []
        used = 0
        for i, example in enumerate(examples):
            n = len(example.input_ids)
            if not bins or used + n > max_length:
                bins.append([])
                used = 0
            bins[-1].append(i)
            used += n
    else:
        bins = _best_fit_decreasing([len(e.input_ids) for e in examples], max_length)
    packed = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids += examples[i].input_ids
            labels += [IGNORE, *examples[i].labels[1:]] if examples[i].labels else []
        packed.append(Example(ids, labels, segments=[len(examples[i].input_ids) for i in members]))
    return packed


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity``: longest first, each into the bin with
    the least room that still holds it. Open bins are kept sorted by room (bisect), O(n log n) searches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rooms: list[tuple[int, int]] = []  # (room left, bin number), sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(rooms, (n, -1))
        if at < len(rooms):
            room, b = rooms.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(rooms, (room - n, b))
    return bins


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
            f"{where}: preference rows need 'prompt', 'chosen' and 'rejected'; missing {missing}, got {_keys(row)}. "
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
        stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
        stats.rows += 1
        stats.truncated += truncated
        for e in (pair.chosen, pair.rejected):
            stats.tokens += len(e.input_ids)
            stats.trained_tokens += sum(label != IGNORE for label in e.labels)
        pairs.append(pair)
    return pairs, stats


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the rows (at least one) for evaluation, chosen by ``seed``."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise ValueError(f"data.eval_fraction={fraction} leaves no training rows out of {len(examples)}")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


# ----- batching ---------------------------------------------------------------------------------------
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation fixed by (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def batch_indices(n: int, batch_size: int, seed: int, start: int = 0) -> Iterator[tuple[int, list[int]]]:
    """(position, row indices) of consecutive global batches over a stream of shuffled epochs.

    Row ``g`` of the stream is ``epoch_order(g // n)[g % n]``, so a run resumed at ``start`` sees exactly
    the batches an uninterrupted run would have seen.
    """
    orders: dict[int, list[int]] = {}
    position = start
    while True:
        rows = []
        for g in range(position * batch_size, (position + 1) * batch_size):
            epoch, i = divmod(g, n)
            if epoch not in orders:
                orders = {e: o for e, o in orders.items() if e >= epoch - 1}
                orders[epoch] = epoch_order(n, seed, epoch)
            rows.append(orders[epoch][i])
        yield position, rows
        position += 1


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (padding carries no loss). Packed examples
    (``segments``) get position ids restarting at each row and a (batch, 1, length, length) boolean mask, True
    where a token may attend (itself and earlier tokens of its own row): one byte per pair (the model's forward
    gets it as is under sdpa, as an additive float mask otherwise: ``fused_loss.forward_inputs``)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.segments for e in examples):
        batch.update(_packed_attention(examples, width))
    return batch


def _packed_attention(examples: list[Example], width: int) -> dict[str, torch.Tensor]:
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    row = torch.full((len(examples), width), -1, dtype=torch.long)  # which row each token belongs to
    for i, e in enumerate(examples):
        start = 0
        for k, n in enumerate(e.segments or [len(e.input_ids)]):
            positions[i, start : start + n] = torch.arange(n)
            row[i, start : start + n] = k
            start += n
        row[i, start:] = torch.arange(width - start) + 1_000_000  # padding: each token on its own
        positions[i, start:] = torch.arange(width - start)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (row[:, :, None] == row[:, None, :]) & causal
    return {"attention_mask": allowed[:, None], "position_ids": positions}
