"""From examples to batches: the held-out split, each epoch's row order, the rows of each global batch (resumable
at any step), and right-padded tensors, with per-row positions and a block-diagonal causal mask for packed rows."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from .sft import IGNORE, Example


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
