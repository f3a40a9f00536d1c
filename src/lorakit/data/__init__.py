"""Training data: read JSONL / CSV / Parquet / saved `datasets` / Hugging Face Hub datasets, rename columns,
tokenize rows, label completions, batch.

One file per job, imports running one way (``hub``, ``columns`` and ``sft`` import no sibling; ``readers``
imports ``hub`` and ``columns``; ``packing`` and ``batching`` import ``sft``; ``preference`` imports ``sft`` and
``batching``):

- ``readers``: ``read_rows``, the rows of a data file, saved dataset or Hub dataset with their locations;
  ``MAX_ROW_BYTES``, the largest row read (patch ``lorakit.data.readers.MAX_ROW_BYTES``: the name re-exported
  here is a copy);
- ``hub``: Hub dataset ids (``org/name:config[split]``, ``HubDataset``, ``as_hub_dataset``,
  ``looks_like_path``), loaded by ``load_hub_split`` through the Hugging Face caches, offline too;
  ``check_hub_dataset``; ``TRAIN_SPLITS`` and ``EVAL_SPLITS``, the splits of an id written without one;
- ``columns``: ``data.columns`` (``map_columns``, ``columns_problem``, ``COLUMN_TARGETS``, the Alpaca
  templates ``ALPACA_PROMPT`` and ``ALPACA_PROMPT_NO_INPUT``);
- ``sft``: ``Example``, ``IGNORE``, the row formats (text, prompt/completion, chat) and their tokenizing and
  labels (``row_kind``, ``tokenize_row``, ``tokenize_chat``, ``tokenize_rows``, ``chat_prompt_ids``), and
  ``DataStats``, the statistics of a tokenized set (``tokenize_rows`` and ``tokenize_pairs`` fill it);
- ``packing``: ``pack`` and ``PACKING_STRATEGIES`` (best-fit decreasing, in order);
- ``preference``: ``PreferencePair``, ``tokenize_pair``, ``tokenize_pairs`` and ``collate_pairs`` for
  ``objective: dpo | orpo``;
- ``batching``: ``split_eval``, ``epoch_order``, ``batch_indices`` and ``collate`` (with the attention mask and
  positions of packed rows).
"""

from .batching import batch_indices, collate, epoch_order, split_eval
from .columns import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    COLUMN_PRESETS,
    COLUMN_TARGETS,
    columns_problem,
    map_columns,
)
from .hub import (
    EVAL_SPLITS,
    TRAIN_SPLITS,
    HubDataset,
    as_hub_dataset,
    check_hub_dataset,
    load_hub_split,
    looks_like_path,
)
from .packing import PACKING_STRATEGIES, pack
from .preference import PreferencePair, collate_pairs, tokenize_pair, tokenize_pairs
from .readers import MAX_ROW_BYTES, read_rows
from .sft import (
    IGNORE,
    DataStats,
    Example,
    chat_prompt_ids,
    row_fields,
    row_kind,
    tokenize_chat,
    tokenize_row,
    tokenize_rows,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "COLUMN_PRESETS",
    "COLUMN_TARGETS",
    "EVAL_SPLITS",
    "IGNORE",
    "MAX_ROW_BYTES",
    "PACKING_STRATEGIES",
    "TRAIN_SPLITS",
    "DataStats",
    "Example",
    "HubDataset",
    "PreferencePair",
    "as_hub_dataset",
    "batch_indices",
    "chat_prompt_ids",
    "check_hub_dataset",
    "collate",
    "collate_pairs",
    "columns_problem",
    "epoch_order",
    "load_hub_split",
    "looks_like_path",
    "map_columns",
    "pack",
    "read_rows",
    "row_fields",
    "row_kind",
    "split_eval",
    "tokenize_chat",
    "tokenize_pair",
    "tokenize_pairs",
    "tokenize_row",
    "tokenize_rows",
]
