"""Reading training data: the rows of a JSONL, CSV or Parquet file or of a saved Hugging Face dataset, each with
its location (``FILE:LINE``, ``FILE row N``) so that every error names where the problem is. A row longer than
``MAX_ROW_BYTES`` is refused without the file being read whole."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


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
