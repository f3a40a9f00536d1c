"""LoRA for ``nn.Embedding``: A is looked up by token id, B maps the rank to the embedding dimension."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer
from .routing import Routing


class LoraEmbedding(LoraLayer):
    """LoRA for ``nn.Embedding``: A is (r x num_embeddings) looked up by token id, B is (dim x r)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @property
    def in_out(self) -> tuple[int, int]:
        return self.base_layer.num_embeddings, self.base_layer.embedding_dim

    def _tables(self):
        return [self.lora_embedding_A, self.lora_embedding_B]

    def _create(self, name: str, r: int) -> None:
        num, dim = self.in_out
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, num))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r))

    def _initialise(self, name: str, init: str) -> None:
        # PEFT's convention for embeddings: A zero, B normal (the update starts at zero either way).
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        if init == "random":
            nn.init.normal_(a)
        else:
            nn.init.zeros_(a)
        nn.init.normal_(b)

    def _own_state(self, name: str) -> dict[str, torch.Tensor]:
        return {
            "lora_embedding_A": self.lora_embedding_A[name],
            "lora_embedding_B": self.lora_embedding_B[name],
        }

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.lora_embedding_A[name].float()
        b = self.lora_embedding_B[name].float()
        return (b @ a).T * self.scaling[name]

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq)

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        hidden = self._lookup(x, self.lora_embedding_A[name].T)
        return (hidden @ self.lora_embedding_B[name].T) * self.scaling[name]

    def _routed_update(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        index = self._row_index(x, routing)
        present, layout = self._present(routing)
        if not present:
            return self.base_layer.weight.new_zeros(*x.shape, self.in_out[1])
        a_cat = torch.cat([self.lora_embedding_A[n] for n in present])  # (sum r, num)
        b_cat = torch.cat([self.lora_embedding_B[n] * self.scaling[n] for n in present], dim=1)
        hidden = self._lookup(x, a_cat.T)  # (rows, ..., sum r)
        mask = routing.mask(layout, 1, index, hidden.dtype)
        if mask is not None:  # None: every row on the one adapter present
            hidden = hidden * mask.view(mask.shape[0], *([1] * (hidden.dim() - 2)), mask.shape[1])
        return hidden @ b_cat.T
