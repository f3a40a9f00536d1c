"""Evaluation: token-level loss and perplexity, and greedy exact-match accuracy, from one forward pass.

Greedy exact match without generating: greedy decoding reproduces a reference answer exactly when, with
the reference fed in (teacher forcing), the most likely next token at every answer position is the
reference token, end-of-turn token included. So one forward pass over (prompt + answer) decides it, by
induction over the answer's tokens. The criterion is token-exact: an answer that spells the same text
with other tokens counts as a miss. ``generate_batch`` still produces real answers, for display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data import Example
from ..stopping import stop_token_ids
from .tasks import TASKS

CAUSAL = TASKS["causal-lm"]


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task=CAUSAL) -> tuple[torch.Tensor, int]:
    """(loss summed over the batch's labelled units, number of units): tokens, or rows for classification."""
    return task.train_loss_sum(model, batch), task.batch_units(batch)


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    exact_match: float | None  # share of scorable rows whose greedy answer is exactly the reference
    scored: int
    samples: list[tuple[str, str, str]]  # (prompt, reference, generated answer), for display

    def as_record(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "exact_match": self.exact_match,
            "scored": self.scored,
        }

    def versus(self, before: EvalResult) -> str | None:
        """One line comparing this result with the one ``before`` training (None without exact match)."""
        if self.exact_match is None or before.exact_match is None:
            return None
        return f"exact match: {100 * before.exact_match:.1f}% before -> {100 * self.exact_match:.1f}% after"

    def describe(self, when: str) -> str:
        acc = f", exact match {100 * self.exact_match:.1f}% of {self.scored}" if self.exact_match is not None else ""
        return f"eval {when}: loss {self.loss:.4f}, perplexity {self.perplexity:.2f}{acc}"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    batch_size: int = 16,
    generate: bool = True,
    max_new_tokens: int = 32,
    samples: int = 3,
    task=CAUSAL,
) -> EvalResult:
    """Loss / perplexity over ``examples``; greedy exact match on rows with a reference (if ``generate``).

    ``samples``: how many rows with a reference get a real greedy answer generated, for display (the first
    ones; fewer when fewer exist; 0 for none). It does not change the figures.
    """
    was_training = model.training
    model.eval()
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    total, count, hits, scored = 0.0, 0, 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in task.collate(chunk, pad).items()}
        logits = task.logits(model, batch)
        total += task.loss_sum(logits, batch).item()
        count += task.batch_units(batch)
        if generate:
            h, s = task.hits(logits, batch, chunk)
            hits, scored = hits + h, scored + s
    mean = total / max(count, 1)
    shown = []
    if generate and samples > 0 and task.name != "classification":
        rows = [e for e in examples if e.scorable and e.reference is not None][:samples]
        shown = sample_answers(model, tokenizer, rows, batch_size, max_new_tokens, task)
    model.train(was_training)
    accuracy = hits / scored if generate and scored else None
    return EvalResult(mean, math.exp(min(mean, 50)), accuracy, scored, shown)


def sample_answers(
    model: nn.Module, tokenizer, rows: list[Example], batch_size: int, max_new_tokens: int, task=CAUSAL
) -> list[tuple[str, str, str]]:
    """(prompt text, reference, greedy answer) of each row, generated ``batch_size`` rows at a time."""
    shown = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [task.prompt(e) for e in chunk]
        answers = generate_batch(model, tokenizer, prompts, max_new_tokens)
        shown += [
            (tokenizer.decode(p, skip_special_tokens=True), e.reference, a)
            for p, e, a in zip(prompts, chunk, answers, strict=True)
        ]
    return shown


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate_batch(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of token-id prompts, left-padded into one batch, ended at the stop tokens of
    ``lorakit.stopping`` (the server's); decoded without special tokens."""
    pad = pad_id(tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=sorted(stop_token_ids(tokenizer, model)) or None,
    )
    start = 0 if getattr(model.config, "is_encoder_decoder", False) else width  # decoders echo the prompt
    return [tokenizer.decode(row[start:], skip_special_tokens=True) for row in out.tolist()]
