"""Prompt tuning (Lester et al., 2021): n trainable embeddings prepended to every input; the model is frozen.

The soft prompt starts as the embeddings of a text (repeated to length n), so training starts from a
sensible point. The wrapper strips the prompt positions from the output logits, so losses and metrics
line up with the unprompted input.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from .base import TrainableStateMethod


class SoftPromptModel(nn.Module):
    def __init__(self, model: nn.Module, init_ids: list[int]) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            init = model.get_input_embeddings().weight[torch.tensor(init_ids)].detach().clone()
        self.soft_prompt = nn.Parameter(init)

    @property
    def config(self):
        return self.model.config

    def _prompted(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        embeds = self.model.get_input_embeddings()(input_ids)
        n = self.soft_prompt.shape[0]
        prompt = self.soft_prompt.to(embeds.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], n), attention_mask], dim=1)
        return torch.cat([prompt, embeds], dim=1), mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        embeds, mask = self._prompted(input_ids, attention_mask)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return SimpleNamespace(logits=out.logits[:, self.soft_prompt.shape[0] :])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Like ``model.generate``: returns the input ids followed by the new tokens."""
        embeds, mask = self._prompted(input_ids, attention_mask)
        new = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return torch.cat([input_ids, new], dim=1)


class PromptTuning(TrainableStateMethod):
    name = "prompt"
    state_file = "soft_prompt.safetensors"

    def __init__(self, length: int = 20, init_text: str = "Write the date as YYYY-MM-DD.", tokenizer=None) -> None:
        if length < 1:
            raise ValueError(f"prompt length {length} is invalid: use >= 1")
        self.length, self.init_text, self.tokenizer = length, init_text, tokenizer

    def prepare(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        ids = self.tokenizer(self.init_text, add_special_tokens=False)["input_ids"] if self.tokenizer else [0]
        ids = (ids * (self.length // max(len(ids), 1) + 1))[: self.length]
        return SoftPromptModel(model, ids)
