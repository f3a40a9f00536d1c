"""The serving engine's KV cache: preallocated buffers, one row per running request, written in place.

Every layer's keys and values live in a buffer of shape (row capacity, heads, column capacity, head dim), with
an attention mask of (row capacity, column capacity) beside them. The running rows are ``[0, rows)``, their
columns ``[lo, hi)``: left-padded, so each row's prompt ends at the same column and every decode step writes
one new column, ``hi``, for all rows at once. Nothing is copied per step:

- a decode step writes its new keys and values into column ``hi`` of each layer's buffer and attends over a
  view of ``[lo, hi]`` (``step_cache``; transformers' attention calls the cache's ``update``);
- requests that join write their own rows only (``add``); a prompt longer than the running ones takes columns
  to the left of ``lo``, which are free (the others' mask is 0 there);
- finished rows are closed up by moving the rows behind them (``keep``), and columns that became padding in
  every row are dropped by moving ``lo`` (no copy).

Only when a buffer is full (more columns to the right or left, or more rows, than it holds) is it reallocated,
at twice the size needed (so the copies amortise to a constant per token). Buffers start zeroed and only ever
hold keys and values a forward produced, so the masked-out places that attention multiplies by zero are finite.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_COLUMNS = 64  # columns allocated beyond what is needed, at the least, when a buffer is (re)allocated
MIN_ROWS = 4


class SlotKV:
    """Keys, values and attention mask of the running rows (see the module docstring). ``max_rows``: the most
    rows it will hold (the engine's batch limit), which caps the row capacity's doubling."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        self.rows = 0
        self.lo = 0
        self.hi = 0
        self.reallocations = 0  # how often the buffers were reallocated (tests and benchmarks read it)

    @property
    def length(self) -> int:
        """Columns in use: the longest running row, prompt and generated tokens."""
        return self.hi - self.lo

    def attention_mask(self, extra: int = 0) -> torch.Tensor:
        """The mask of the running rows over ``[lo, hi + extra)`` (a view)."""
        return self.mask[: self.rows, self.lo : self.hi + extra]

    def clear(self) -> None:
        """No running rows (the buffers stay allocated for the next requests)."""
        self.rows, self.lo, self.hi = 0, 0, 0

    def add(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Append rows: per layer (keys, values) of shape (new rows, heads, L, head dim) and their (new rows, L)
        mask, left-padded like the running rows (a prefill's cache)."""
        new, width = mask.shape
        if self.rows == 0:  # nothing running: place the prompts at the start of the buffers
            self.lo = self.hi = width
        total = max(self.length, width)
        self._ensure(kv, self.rows + new, left=total - self.length, right=0)
        if self.hi - total < self.lo:  # the joining prompt is longer: the running rows are padding there
            self.mask[: self.rows, self.hi - total : self.lo] = 0
            self.lo = self.hi - total
        start = self.hi - width
        rows = slice(self.rows, self.rows + new)
        self.mask[rows, self.lo : start] = 0
        self.mask[rows, start : self.hi] = mask
        for buffer, (k, _) in zip(self.keys, kv, strict=True):
            buffer[rows, :, start : self.hi] = k
        for buffer, (_, v) in zip(self.values, kv, strict=True):
            buffer[rows, :, start : self.hi] = v
        self.rows += new

    def step_cache(self) -> Cache:
        """A transformers ``Cache`` for one decode step of every running row: each layer's ``update`` writes
        the step's keys and values into column ``hi`` and returns the view over ``[lo, hi]``; the mask's column
        ``hi`` is set to 1 first. Call ``advance`` after the forward."""
        self.prepare_step()
        return Cache(layers=[_StepLayer(self, i) for i in range(len(self.keys))])

    def prepare_step(self) -> None:
        """Room for one more column at ``hi`` and the running rows' mask set there: what a decode step writes
        into (``step_cache``, or the engine's own step, ``serve.step``)."""
        self._ensure(None, self.rows, left=0, right=1)
        self.mask[: self.rows, self.hi] = 1

    def advance(self) -> None:
        """The decode step's column is written: take it into the running columns."""
        self.hi += 1

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (ascending row numbers), closed up in that order, and drop the leading columns
        that are now padding in every row."""
        if not rows:
            self.clear()
            return
        if rows != list(range(len(rows))):
            index = torch.tensor(rows, device=self.mask.device)
            cols = slice(self.lo, self.hi)
            self.mask[: len(rows), cols] = self.mask[index, cols]
            for buffer in (*self.keys, *self.values):
                buffer[: len(rows), :, cols] = buffer[index, :, cols]
        self.rows = len(rows)
        self.lo += int(self.attention_mask().any(0).nonzero()[0])  # every row holds its prompt: some column is used

    # ----- buffers -------------------------------------------------------------------------------------------
    def _ensure(self, like: list[tuple[torch.Tensor, torch.Tensor]] | None, rows: int, left: int, right: int) -> None:
        """Room for ``rows`` rows, ``left`` free columns before ``lo`` and ``right`` from ``hi`` on: the present
        buffers, or new ones (twice what is needed, the running rows' columns copied over)."""
        if self.mask is not None:
            rows_fit = rows <= self.mask.shape[0]
            if rows_fit and self.lo >= left and self.hi + right <= self.mask.shape[1]:
                return
            row_cap = self.mask.shape[0] if rows_fit else min(max(2 * rows, MIN_ROWS), max(self.max_rows, rows))
        else:
            row_cap = min(max(2 * rows, MIN_ROWS), max(self.max_rows, rows))
        like = like if like is not None else list(zip(self.keys, self.values, strict=True))
        col_cap = left + self.length + max(right, self.length, MIN_COLUMNS)
        device = like[0][0].device
        keys = [torch.zeros(_shape(k, row_cap, col_cap), dtype=k.dtype, device=device) for k, _ in like]
        values = [torch.zeros(_shape(v, row_cap, col_cap), dtype=v.dtype, device=device) for _, v in like]
        mask = torch.zeros(row_cap, col_cap, dtype=torch.long, device=device)
        old, new = slice(self.lo, self.hi), slice(left, left + self.length)
        if self.rows:
            mask[: self.rows, new] = self.mask[: self.rows, old]
            for dst, src in zip((*keys, *values), (*self.keys, *self.values), strict=True):
                dst[: self.rows, :, new] = src[: self.rows, :, old]
        self.lo, self.hi = left, left + self.length
        self.keys, self.values, self.mask = keys, values, mask
        self.reallocations += 1


def _shape(t: torch.Tensor, rows: int, cols: int) -> tuple[int, ...]:
    return (rows, t.shape[1], cols, t.shape[3])


class _StepLayer(DynamicLayer):
    """One layer's cache for a decode step over ``SlotKV``'s buffers (see ``SlotKV.step_cache``)."""

    def __init__(self, slots: SlotKV, index: int) -> None:
        super().__init__()
        self.slots = slots
        self.index = index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        s = self.slots
        keys, values = s.keys[self.index], s.values[self.index]
        keys[: s.rows, :, s.hi : s.hi + 1] = key_states
        values[: s.rows, :, s.hi : s.hi + 1] = value_states
        return keys[: s.rows, :, s.lo : s.hi + 1], values[: s.rows, :, s.lo : s.hi + 1]

    def get_seq_length(self) -> int:
        return self.slots.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots.length + query_length, 0
