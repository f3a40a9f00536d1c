"""Packing: tokenized rows placed whole into sequences of at most ``max_length`` tokens, best-fit decreasing
or in order, each sequence recording its rows' lengths so that no token attends across rows."""

from __future__ import annotations

import bisect

from .sft import IGNORE, Example

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
