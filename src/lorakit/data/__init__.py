"""Training data: read JSONL / CSV / Parquet / saved `datasets`, tokenize rows, label completions, batch.

One file per job, imports running one way (``readers`` and ``sft`` import no sibling; ``packing`` and
``batching`` import ``sft``; ``preference`` imports ``sft`` and ``batching``):

- ``readers``: ``read_rows``, the rows of a data file or saved dataset with their locations; ``MAX_ROW_BYTES``,
  the largest row read (patch ``lorakit.data.readers.MAX_ROW_BYTES``: the name re-exported here is a copy);
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
from .packing import PACKING_STRATEGIES, pack
from .preference import PreferencePair, collate_pairs, tokenize_pair, tokenize_pairs
from .readers import MAX_ROW_BYTES, read_rows
from .sft import IGNORE, DataStats, Example, chat_prompt_ids, row_kind, tokenize_chat, tokenize_row, tokenize_rows

__all__ = [
    "IGNORE",
    "MAX_ROW_BYTES",
    "PACKING_STRATEGIES",
    "DataStats",
    "Example",
    "PreferencePair",
    "batch_indices",
    "chat_prompt_ids",
    "collate",
    "collate_pairs",
    "epoch_order",
    "pack",
    "read_rows",
    "row_kind",
    "split_eval",
    "tokenize_chat",
    "tokenize_pair",
    "tokenize_pairs",
    "tokenize_row",
    "tokenize_rows",
]
