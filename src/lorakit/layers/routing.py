"""Per-row adapter choice for a mixed batch (``lorakit.route``): which rows use which adapter in one forward."""

from __future__ import annotations

import torch


class Routing:
    """Per-row adapter choice for one forward: ``names[k]`` is adapter k+1; index 0 means the base model.

    A layer may see the batch's rows flattened with their tokens, or otherwise reshaped so that its leading
    dimension is a multiple of the number of rows (OPT's decoder runs its MLP on (rows * tokens, hidden)):
    as long as each row's entries stay together, in row order, ``rows_for`` repeats each row's choice for
    its entries. ``route`` checks the model's own input against the row count, so a multiple seen inside
    is a reshape, never a wrong count.

    ``stacks`` (inference only), when given, keeps each layer's concatenated adapter tensors across forwards
    for the current ``names``: an inference server passes one dict for as long as its adapters' weights stay
    the same, and clears it when they change. Without it nothing is kept (what training needs).
    """

    def __init__(self, names: list[str], index: torch.Tensor, stacks: dict | None = None) -> None:
        self.names = names
        self.key = tuple(names)
        self.index = index
        self.stacks = stacks
        self._masks: dict = {}
        self._rows: dict = {}

    def rows_for(self, lead: int, device: torch.device) -> torch.Tensor:
        """The adapter number of each of ``lead`` leading entries a layer sees (the rows, or their parts)."""
        key = (lead, device)
        if key not in self._rows:
            rows = self.index.shape[0]
            if lead % rows:
                raise ValueError(
                    f"route() was given {rows} row names but the batch has {lead} rows; "
                    "pass one adapter name (or None) per row"
                )
            index = self.index.to(device, non_blocking=True)
            self._rows[key] = index.repeat_interleave(lead // rows) if lead != rows else index
        return self._rows[key]

    def mask(self, layout: tuple, tokens: int, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """(entries * tokens, sum of ranks) 0/1 mask keeping each entry's own adapter columns; ``index`` holds
        each leading entry's adapter number and ``layout`` lists (adapter number, rank) in column order; None
        where it would keep every column (every row on the one adapter present). Built once per forward for
        each layout, shape and dtype."""
        key = (layout, index.shape[0], tokens, dtype)
        if key not in self._masks:
            owner = torch.cat([torch.full((r,), k, dtype=torch.long) for k, r in layout]).to(index.device)
            keep = index[:, None] == owner[None, :]
            mask = None if bool(keep.all()) else keep.to(dtype)
            self._masks[key] = mask.repeat_interleave(tokens, dim=0) if tokens > 1 and mask is not None else mask
        return self._masks[key]
