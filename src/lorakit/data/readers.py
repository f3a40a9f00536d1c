"""Reading training data: the rows of a JSONL, CSV or Parquet file, of a saved Hugging Face dataset or of a
dataset on the Hugging Face Hub (``hub``), each with its location (``FILE:LINE``, ``FILE row N``,
``org/name:config[split] row N``) so that every error names where the problem is; then, where ``data.columns``
says so, their columns renamed (``columns``). A row longer than ``MAX_ROW_BYTES`` is refused (in a JSONL or CSV
file without the file being read whole)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .columns import map_columns
from .hub import TRAIN_SPLITS, as_hub_dataset, load_hub_split


def read_rows(
    source: str | Path,
    columns: dict[str, str] | str | None = None,
    *,
    splits: tuple[str, ...] = TRAIN_SPLITS,
    log: Callable[[str], None] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) pairs from a data file, a saved Hugging Face dataset or a Hub dataset id; errors name the
    location. A path that exists wins; else ``source`` is read as a Hub id (``org/name:config[split]``, see
    ``lorakit.data.hub``), unless it is written as a path (a data file suffix, ./ ../ / ~ in front): then it is a
    missing file. ``splits``: the split of an id written without one (the first of these it has); ``columns``:
    ``data.columns`` (see ``lorakit.data.columns``); ``log``: where the Hub reader says what it read (stderr)."""
    path = Path(source).expanduser()
    if path.exists():
        rows = _read_local(path)
        name = str(path)
    else:
        ref = as_hub_dataset(str(source))
        if ref is None:
            raise ValueError(f"data file {source} does not exist")
        name, dataset = load_hub_split(ref, splits, log)
        rows = _table_rows(name, dataset.to_list())
    if not rows:
        raise ValueError(f"{name} holds no rows; a dataset needs at least one")
    return map_columns(rows, columns)


def _read_local(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if path.is_dir():
        return _read_saved_dataset(path)
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".csv":
        return _read_csv(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .csv, .parquet or a saved dataset")


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
    return _table_rows(str(path), table.to_pylist())


def _read_saved_dataset(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError and its own errors
        raise ValueError(f"{path}: not a dataset saved with Dataset.save_to_disk ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"{path} holds several splits ({', '.join(loaded)}); point at one, e.g. {path}/train")
    return _table_rows(str(path), loaded.to_list())


def _table_rows(name: str, rows: Iterable[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a table (Parquet, saved or Hub dataset) located as ``NAME row N``; one over ``MAX_ROW_BYTES`` is
    refused (the table is in memory already, but a row that large would only be truncated by tokenizing)."""
    located = []
    for i, row in enumerate(rows):
        where = f"{name} row {i}"
        if _size(row) > MAX_ROW_BYTES:
            raise _too_long(where)
        located.append((where, row))
    return located


def _size(value: Any) -> int:
    """About the bytes of a row's values (the UTF-8 length of its text; a string counts its characters where
    even four bytes each could not reach the limit)."""
    if isinstance(value, str):
        return len(value) if 4 * len(value) <= MAX_ROW_BYTES else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _size(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_size(v) for v in value)
    return 8
