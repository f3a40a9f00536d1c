"""What differs between model heads: how a row becomes tensors, the loss, and what counts as a correct answer.

- causal-lm: next-token loss on labelled tokens; an answer is right when greedy decoding reproduces it.
- seq2seq (T5 family): prompt -> encoder, completion -> decoder labels; same greedy criterion on the decoder.
- classification (BERT family): ``text`` + ``label`` rows; cross-entropy over classes; right when argmax = label.
Each task sums its loss and reports how many units (tokens or rows) it summed over, so the trainer can
normalise over a whole global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE, Example, collate, row_fields, tokenize_row
from ..models import TASK_NAMES
from ..precision import autocast_off
from .fused_loss import (
    CHUNK,
    causal_loss_sum,
    compute_dtype,
    forward_inputs,
    fused_head,
    head_as_identity,
    supports_fused_loss,
)

EVAL_CHUNK = CHUNK
"""Positions whose logits evaluation computes at a time on the chunked path (``CausalLM.eval_sums``)."""


class CausalLM:
    name = "causal-lm"
    fused_loss = True  # training loss without materialising the logits, where the model allows it

    def tokenize(
        self, row: dict[str, Any], where: str, tokenizer, completion_only: bool, model_config
    ) -> tuple[Example, str]:
        return tokenize_row(row, where, tokenizer, completion_only)

    def collate(self, examples: list[Example], pad: int) -> dict[str, torch.Tensor]:
        return collate(examples, pad)

    def prompt(self, example: Example) -> list[int]:
        """What generation starts from, for showing sample answers."""
        return example.prompt_ids

    def units(self, example: Example) -> int:
        """Loss units (labelled next tokens) in one row: the trainer normalises by their global sum."""
        return sum(label != IGNORE for label in example.labels[1:])

    def batch_units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"][:, 1:].ne(IGNORE).sum())

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**forward_inputs(batch, getattr(model, "module", model))).logits

    def train_loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss to train on (summed over labelled units); ``model`` may be a DDP wrapper."""
        inner = getattr(model, "module", model)
        if self.fused_loss and supports_fused_loss(inner):
            return causal_loss_sum(model, inner, batch)
        return self.loss_sum(self.logits(model, batch), batch)

    def loss_sum(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        shifted = logits[:, :-1]
        return F.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]).float(),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )

    def hits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], examples: list[Example]) -> tuple[int, int]:
        """Greedy decoding reproduces an answer iff, teacher-forced, each answer token is the argmax."""
        return _answer_hits(logits.argmax(-1), batch, examples)

    def eval_sums(
        self, model: nn.Module, batch: dict[str, torch.Tensor], examples: list[Example], score: bool
    ) -> tuple[float, int, int]:
        """(loss sum, exact-match hits, scored rows; 0 and 0 unless ``score``) of one evaluation batch.

        A causal LM whose logits are one linear layer's output (``fused_head``) runs the head over its final
        hidden states ``EVAL_CHUNK`` positions at a time, and only at the labelled positions and the answers':
        the (batch, tokens, vocabulary) logits never exist. Same figures as the path through the logits, which
        the other models and tasks take (loss to float32 rounding; the argmax of the same products)."""
        inner = getattr(model, "module", model)
        if self.fused_loss and fused_head(inner) is not None:
            return _chunked_sums(model, inner, batch, examples if score else [])
        logits = self.logits(model, batch)
        hits, scored = self.hits(logits, batch, examples) if score else (0, 0)
        return self.loss_sum(logits, batch).item(), hits, scored


class Seq2Seq(CausalLM):
    fused_loss = False
    name = "seq2seq"

    def tokenize(self, row, where, tokenizer, completion_only, model_config) -> tuple[Example, str]:
        if not (isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)):
            raise ValueError(
                f"{where}: seq2seq training needs 'prompt' and 'completion' string fields; got {row_fields(row)}"
            )
        source = tokenizer(row["prompt"])["input_ids"]
        target = tokenizer(row["completion"])["input_ids"]
        if tokenizer.eos_token_id is not None and target[-1:] != [tokenizer.eos_token_id]:
            target.append(tokenizer.eos_token_id)  # generation stops there
        return Example(source, target, 0, len(target), reference=row["completion"]), "prompt"

    def prompt(self, example: Example) -> list[int]:
        return example.input_ids  # the whole encoder input; the answer is the decoder's

    def collate(self, examples: list[Example], pad: int) -> dict[str, torch.Tensor]:
        sources = collate([Example(e.input_ids, e.input_ids) for e in examples], pad)
        targets = collate([Example(e.labels, e.labels) for e in examples], pad)
        return {
            "input_ids": sources["input_ids"],
            "attention_mask": sources["attention_mask"],
            "labels": targets["labels"],
        }

    def units(self, example: Example) -> int:
        return len(example.labels)

    def batch_units(self, batch):
        return int(batch["labels"].ne(IGNORE).sum())

    def logits(self, model, batch):
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).logits

    def loss_sum(self, logits, batch):
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            batch["labels"].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )

    def hits(self, logits, batch, examples):
        """The decoder's logits at step t already predict label t (T5 shifts the labels right itself)."""
        hits = scored = 0
        for i, example in enumerate(examples):
            if example.scorable:
                n = example.answer_end
                hits += bool((logits[i, :n].argmax(-1) == batch["labels"][i, :n]).all())
                scored += 1
        return hits, scored


class Classification(CausalLM):
    fused_loss = False
    name = "classification"

    def tokenize(self, row, where, tokenizer, completion_only, model_config) -> tuple[Example, str]:
        if not isinstance(row.get("text"), str) or "label" not in row:
            raise ValueError(f"{where}: classification rows need 'text' (a string) and 'label'; got {row_fields(row)}")
        label = _label_id(row["label"], model_config, where)
        return Example(tokenizer(row["text"])["input_ids"], [label], 0, 1, reference=str(row["label"])), "text"

    def collate(self, examples, pad):
        batch = collate([Example(e.input_ids, e.input_ids) for e in examples], pad)
        batch["labels"] = torch.tensor([e.labels[0] for e in examples])
        return batch

    def units(self, example: Example) -> int:
        return 1

    def batch_units(self, batch):
        return batch["labels"].numel()

    def logits(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss_sum(self, logits, batch):
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def hits(self, logits, batch, examples):
        return int((logits.argmax(-1) == batch["labels"]).sum()), len(examples)


def _answer_hits(predicted: torch.Tensor, batch, examples: list[Example]) -> tuple[int, int]:
    """(hits, scored) of a causal LM's scorable rows from its argmax tokens ``predicted`` (batch, tokens)."""
    hits = scored = 0
    for i, example in enumerate(examples):
        if example.scorable and example.reference is not None:
            a, b = example.answer_start, example.answer_end
            hits += bool((predicted[i, a - 1 : b - 1] == batch["input_ids"][i, a:b]).all())
            scored += 1
    return hits, scored


def _chunked_sums(model: nn.Module, inner: nn.Module, batch, examples: list[Example]) -> tuple[float, int, int]:
    """``CausalLM.eval_sums`` through the head in chunks; ``examples``: the rows to score (none: loss only)."""
    with head_as_identity(inner) as head:
        hidden = model(**forward_inputs(batch, inner)).logits  # the final hidden states
    rows, width = batch["input_ids"].shape
    flat = hidden.reshape(rows * width, hidden.shape[-1])
    targets = torch.full_like(batch["labels"], IGNORE)
    targets[:, :-1] = batch["labels"][:, 1:]  # position t predicts token t + 1
    targets = targets.view(-1)
    wanted = targets != IGNORE
    for i, e in enumerate(examples):  # the answers' positions, labelled or not: their argmax decides a hit
        if e.scorable and e.reference is not None:
            wanted[i * width + max(e.answer_start - 1, 0) : i * width + e.answer_end - 1] = True
    positions = wanted.nonzero().squeeze(1)
    predicted = torch.full_like(targets, -1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    dtype = compute_dtype(flat, head.weight)  # autocast's, read before turning it off: the model's own head's
    weight = head.weight.detach().to(dtype)
    bias = head.bias.detach().to(dtype) if head.bias is not None else None
    with autocast_off(flat.device.type):
        for start in range(0, positions.numel(), EVAL_CHUNK):
            index = positions[start : start + EVAL_CHUNK]
            logits = F.linear(flat.index_select(0, index).to(dtype), weight, bias).float()
            target = targets.index_select(0, index)
            total += F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum").double()
            predicted.index_copy_(0, index, logits.argmax(-1))
    hits, scored = _answer_hits(predicted.view(rows, width), batch, examples)
    return total.item(), hits, scored


def _label_id(label: Any, model_config, where: str) -> int:
    n = model_config.num_labels
    names = {str(k): v for k, v in (getattr(model_config, "label2id", None) or {}).items()}
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < n:
        return label
    if isinstance(label, str) and label in names:
        return int(names[label])
    if isinstance(label, str) and label.isdigit() and int(label) < n:  # CSV cells are text
        return int(label)
    raise ValueError(
        f"{where}: label {label!r} is not a class of this model: use an integer 0..{n - 1} or one of {sorted(names)}"
    )


TASKS = dict(zip(TASK_NAMES, (CausalLM(), Seq2Seq(), Classification()), strict=True))
assert all(name == task.name for name, task in TASKS.items())
