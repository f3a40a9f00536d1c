"""Shared-input groups: LoRA linear layers of one parent that read the same input (q/k/v, gate/up).

The group runs every member's fast path with one ``x [A_1; ...; A_n]^T`` product
(``SharedInputLoraFunction``), in the members' one dtype or, under ``torch.autocast``, in autocast's (every
tensor cast to it, as for one member's fast path). Each member names its group in its repr ("shared input
with k_proj, v_proj").
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import SharedInputLoraFunction, apply_in
from .linear import LoraLinear


class SharedInput:
    """LoRA linear layers of one parent that read the same input, such as q/k/v or gate/up projections.

    The first member called with an input computes every member's output at once (one ``x A^T`` product
    against the stacked A matrices, see ``_SharedInputLoraFunction``); the others then pick theirs up when
    the model calls them with that same tensor. Should the model call a member with some other input, or
    skip a member (cross-attention, where k and v read the encoder's states), the group switches itself
    off for good and every member runs on its own. It also steps aside, for that call, whenever some member
    cannot take the fused path (several or merged adapters, dropout in training, mixed dtypes outside
    autocast, routing).
    """

    def __init__(self, members: list[LoraLinear], names: list[str] | None = None) -> None:
        self.members = members
        self.names = names or [f"member {i}" for i in range(len(members))]
        self.enabled = True
        self._input: torch.Tensor | None = None
        self._version = -1
        self._pending: dict[int, torch.Tensor] = {}

    def output(self, member: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output for ``x``, or None when the member should run on its own."""
        if not self.enabled:
            return None
        if self._pending:
            if self._input is x and _version_of(x) == self._version and id(member) in self._pending:
                out = self._pending.pop(id(member))
                if not self._pending:
                    self._input = None
                return out
            # the previous input's outputs were not all collected: the members do not share one input
            self.enabled = False
            self._pending.clear()
            self._input = None
            return None
        plans = [m.fast_path_adapter(x, (), {}) for m in self.members]
        if None in plans:
            return None
        tensors, layout = [], []
        for m, (name, _) in zip(self.members, plans, strict=True):
            base = m.base_layer
            tensors += [base.weight, base.bias, m.lora_A[name].weight, m.lora_B[name].weight]
            layout.append((m.r[name], m.scaling[name]))
        dtype = plans[0][1]  # every member's: autocast's, or else x's (each member's tensors share x's dtype)
        outs = apply_in(SharedInputLoraFunction, dtype, x, tuple(layout), *tensors)
        self._pending = {id(m): out for m, out in zip(self.members, outs, strict=True) if m is not member}
        self._input, self._version = x, _version_of(x)
        return outs[self.members.index(member)]

    def describe(self, member: LoraLinear) -> str:
        """The other members' names, for ``member``'s repr."""
        return ", ".join(n for m, n in zip(self.members, self.names, strict=True) if m is not member)


def _version_of(x: torch.Tensor) -> int:
    """In-place modification counter; inference tensors keep none (and cannot change outside inference mode)."""
    return -1 if x.is_inference() else x._version


# Sibling layers that read the same input in common model families (LLaMA, Mistral, Qwen, Gemma, BERT,
# T5, Mixtral experts): grouped by name under one parent.
SHARED_INPUT_NAMES = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
    ("wq", "wk", "wv"),
    ("w1", "w3"),
)


def link_shared_inputs(model: nn.Module) -> int:
    """(Re)build the ``SharedInput`` groups of a model's LoRA linear layers; returns how many groups."""
    count = 0
    for parent in model.modules():
        for names in SHARED_INPUT_NAMES:
            found = [(n, parent._modules.get(n)) for n in names]
            found = [(n, m) for n, m in found if type(m) is LoraLinear]
            for _, m in found:
                m.shared_input = None
            if len(found) > 1:
                group = SharedInput([m for _, m in found], [n for n, _ in found])
                for _, m in found:
                    m.shared_input = group
                count += 1
    return count
