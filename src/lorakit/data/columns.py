"""``data.columns``: the columns of a dataset renamed onto those lorakit reads, or Alpaca rows made prompt +
completion rows.

- a mapping ``{target: column}``, e.g. ``{prompt: question, completion: answer}``: each target (one of
  ``COLUMN_TARGETS``) takes the value of that column, which no longer appears under its own name; the row's other
  columns stay as they are;
- ``alpaca``: rows of ``instruction``, ``input`` (optional, may be empty) and ``output`` become
  ``{"prompt": ALPACA_PROMPT or ALPACA_PROMPT_NO_INPUT filled in, "completion": output}``: the Stanford Alpaca
  templates (tatsu-lab/stanford_alpaca), ending with a newline after ``### Response:`` as in the ``text`` column of
  the tatsu-lab/alpaca dataset.
"""

from __future__ import annotations

import difflib
from typing import Any

COLUMN_TARGETS = ("text", "prompt", "completion", "messages", "chosen", "rejected", "label")
"""The columns lorakit reads: text; prompt + completion; messages; prompt + chosen + rejected (dpo, orpo);
text + label (classification)."""

COLUMN_PRESETS = ("alpaca",)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""The Alpaca prompt of a row whose ``input`` is not empty."""

ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
"""The Alpaca prompt of a row without ``input`` (missing, null or empty)."""


def columns_problem(columns: Any) -> str | None:
    """What is wrong with a ``data.columns`` value (naming the key and the fix), or None."""
    targets = ", ".join(COLUMN_TARGETS)
    if columns is None or columns == {}:
        return None
    if isinstance(columns, str):
        if columns in COLUMN_PRESETS:
            return None
        return (
            f"data.columns={columns!r}: use a mapping {{target: column of the data}} (e.g. {{prompt: question, "
            f"completion: answer}}; targets: {targets}) or the preset {' or '.join(COLUMN_PRESETS)}"
        )
    if not isinstance(columns, dict):
        return f"data.columns={columns!r}: use a mapping {{target: column of the data}} or a preset name"
    for target, source in columns.items():
        if target not in COLUMN_TARGETS:
            return (
                f"data.columns.{target}: {target!r} is not a column lorakit reads; map onto {targets} "
                f"(as {{target: column of the data}}, e.g. {{prompt: {target}}})"
            )
        if not isinstance(source, str) or not source:
            return f"data.columns.{target}={source!r}: name a column of the data (a string)"
    return None


def map_columns(
    rows: list[tuple[str, dict[str, Any]]], columns: dict[str, str] | str | None
) -> list[tuple[str, dict[str, Any]]]:
    """``rows`` (location, row) with ``columns`` applied (None or {}: as they are). Errors name the location,
    the missing column and the columns the row has."""
    if not columns:
        return rows
    problem = columns_problem(columns)
    if problem:
        raise ValueError(problem)
    if columns == "alpaca":
        return [(where, _alpaca(row, where)) for where, row in rows]
    assert isinstance(columns, dict)
    sources = set(columns.values())
    mapped = []
    for where, row in rows:
        for target, source in columns.items():
            if source not in row:
                raise ValueError(_missing(where, row, source, f"data.columns maps {target} to column {source!r}"))
        new = {k: v for k, v in row.items() if k not in sources}
        new.update({target: row[source] for target, source in columns.items()})
        mapped.append((where, new))
    return mapped


def _alpaca(row: dict[str, Any], where: str) -> dict[str, Any]:
    for name in ("instruction", "output"):
        if name not in row:
            raise ValueError(_missing(where, row, name, f"data.columns=alpaca needs a column {name!r}"))
    values = {name: row.get(name) for name in ("instruction", "input", "output")}
    for name, value in values.items():
        if not isinstance(value, str) and not (name == "input" and value is None):
            raise ValueError(f"{where}: data.columns=alpaca needs {name!r} to be a string, got {type(value).__name__}")
    template = ALPACA_PROMPT if values["input"] else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=values["instruction"], input=values["input"])
    return {"prompt": prompt, "completion": values["output"]}


def _missing(where: str, row: dict[str, Any], column: str, what: str) -> str:
    close = difflib.get_close_matches(column, [str(k) for k in row], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where}: {what}, which the data lacks; its columns: {', '.join(map(str, row)) or 'none'}{hint}"
