"""Retention: how much of its base model's general behaviour a tuned model kept (``lorakit eval --retention``).

Two measures, both offline and in minutes on a CPU (about 100 s of one core for the embedded 135M model):

- drift, on general text (the shipped set: prose of the Python documentation, ``retention_data/README.md``):
  at every position of every passage, the KL divergence KL(base || tuned) between the two models' next-token
  distributions (nats per token, averaged over positions) and whether their most likely next tokens agree;
  also each model's loss on the text's own next tokens.
- kept knowledge, on probes (short multiple-choice questions, shipped or the user's): each model picks the
  choice it gives the highest log-likelihood after ``Question: ...\\nAnswer:``, summed over the choice's tokens
  (the probability of the whole answer; the shipped choices are short and alike in length, so no normalisation
  by length: ``normalise=True`` divides by the token count instead). The kept share is the share of the probes
  the base answers right that the tuned model still answers right.

The base and the tuned model see the same batches. With an adapter, one loaded model serves both: the base
is its forward inside ``adapters.disabled`` (``base_model=None``), so the base is not loaded twice. Forwards
run under ``torch.inference_mode`` in the caller's precision context; the output head runs on at most
``CHUNK`` positions at a time and the log-softmax, KL and log-likelihoods are computed in float32, so no
full-vocabulary logits tensor of a whole batch is ever built (49,152 entries a position for SmolLM2).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import disabled
from ..state import has_adapters
from .evaluate import pad_id
from .fused_loss import fused_head, head_as_identity

DATA = Path(__file__).resolve().parent.parent / "retention_data"
TEXTS_FILE = DATA / "general.jsonl"
PROBES_FILE = DATA / "probes.jsonl"
PROMPT = "Question: {question}\nAnswer:"  # the choice follows after one space
CHUNK = 256  # positions whose full-vocabulary logits exist at once: 256 x 49,152 float32 = 50 MB


@dataclass(frozen=True)
class Probe:
    question: str
    choices: tuple[str, ...]
    answer: int  # index of the right choice
    id: str = ""


@dataclass(frozen=True)
class ProbeResult:
    id: str
    question: str
    answer: int
    base_choice: int
    tuned_choice: int


@dataclass
class RetentionReport:
    probes: int  # probes asked
    base_right: int  # the base model's right answers
    tuned_right: int  # the tuned model's right answers
    kept: int  # probes both answer right
    texts: int  # general-text passages
    tokens: int  # next-token positions compared
    kl: float  # mean KL(base || tuned) per position, nats
    agreement: float  # share of positions where both models' most likely next token is the same
    base_loss: float  # mean negative log-likelihood of the texts' own next tokens, base model
    tuned_loss: float  # the same, tuned model
    details: list[ProbeResult] = field(default_factory=list, repr=False)

    @property
    def kept_share(self) -> float | None:
        """Share of the base's right answers the tuned model still gets right (None when the base got none)."""
        return self.kept / self.base_right if self.base_right else None

    @property
    def lost(self) -> list[ProbeResult]:
        """Probes the base answers right and the tuned model does not."""
        return [d for d in self.details if d.base_choice == d.answer != d.tuned_choice]

    def summary(self) -> str:
        drift = (
            f"KL {_kl(self.kl)} nats/token, top-1 agreement {100 * self.agreement:.1f} % over {self.tokens:,} tokens"
        )
        if self.kept_share is None:
            return f"retention: the base model answers none of {self.probes} probes right, nothing to keep ({drift})"
        return f"retention: {100 * self.kept_share:.1f} % of {self.base_right} probes kept ({drift})"

    def describe(self) -> str:
        """A second line: the probe counts and the loss on the general text, base and tuned."""
        return (
            f"  probes: base right {self.base_right} of {self.probes}, tuned right {self.tuned_right}, kept "
            f"{self.kept}, lost {self.base_right - self.kept}; general text: {self.texts} passages, loss "
            f"{self.base_loss:.3f} (base) -> {self.tuned_loss:.3f} (tuned)"
        )

    def as_record(self) -> dict:
        return {
            "kept_share": self.kept_share,
            "probes": self.probes,
            "base_right": self.base_right,
            "tuned_right": self.tuned_right,
            "kept": self.kept,
            "kl": self.kl,
            "top1_agreement": self.agreement,
            "tokens": self.tokens,
            "texts": self.texts,
            "base_loss": self.base_loss,
            "tuned_loss": self.tuned_loss,
            "lost": [d.id or d.question for d in self.lost],
        }


def _kl(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


# ----- the sets ---------------------------------------------------------------------------------------------
def _rows(path: str | Path, what: str, example: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file; one clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file; give a JSONL file, one object a line, like {example}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{what} {path}: line {number} is not JSON ({err.msg}); write one object a line, like {example}"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{what} {path}: line {number} is {type(row).__name__}, not an object like {example}")
            rows.append((number, row))
    if not rows:
        raise ValueError(f"{what} {path}: the file has no rows; write one object a line, like {example}")
    return rows


def load_texts(path: str | Path | None = None, what: str = "texts") -> list[str]:
    """The general-text passages of a JSONL file with a ``text`` field per line (default: the shipped set)."""
    example = '{"text": "A passage of general text."}'
    texts = []
    for number, row in _rows(path or TEXTS_FILE, what, example):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            found = "has no 'text' field" if "text" not in row else "has an empty or non-string 'text'"
            raise ValueError(f"{what} {path or TEXTS_FILE}: line {number} {found}; each line needs one, like {example}")
        texts.append(text)
    return texts


def load_probes(path: str | Path | None = None, what: str = "probes") -> list[Probe]:
    """Multiple-choice probes of a JSONL file (default: the shipped set). Each line: ``question`` (text),
    ``choices`` (two or more different texts), ``answer`` (the right choice's index, or its text); ``id``
    optional."""
    example = '{"question": "What is the capital of France?", "choices": ["Paris", "Lyon"], "answer": 0}'
    source = path or PROBES_FILE
    probes = []
    for number, row in _rows(source, what, example):
        where = f"{what} {source}: line {number}"
        question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where} needs a non-empty 'question' text, like {example}")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)
            or len({c.strip() for c in choices}) != len(choices)
        ):
            raise ValueError(
                f"{where}: 'choices' must be a list of two or more different non-empty texts, like {example}"
            )
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(
                f"{where}: 'answer' {answer!r} is neither the index of one of its {len(choices)} choices (0 to "
                f"{len(choices) - 1}) nor one of their texts"
            )
        probes.append(Probe(question.strip(), tuple(c.strip() for c in choices), answer, str(row.get("id", ""))))
    return probes


# ----- forwards ---------------------------------------------------------------------------------------------
def _pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask: a causal model's real positions do not see the padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, adapters_off: bool):
    """(final hidden states, the linear head that makes them logits), or (logits, None) for a model whose logits
    are not one linear layer's output (soft-capping, scaling, a wrapped head)."""
    with disabled(model) if adapters_off else contextlib.nullcontext():
        head = fused_head(model)
        if head is None:
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits, None
        with head_as_identity(model):
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits, head


def _log_probs(states: torch.Tensor, head: nn.Module | None) -> torch.Tensor:
    """Float32 log-softmax over the vocabulary of (positions, hidden) states, or of logits when ``head`` is None."""
    logits = states if head is None else head(states)
    return logits.float().log_softmax(-1)


class _Sides:
    """The base and the tuned model, run on the same batches."""

    def __init__(self, base: nn.Module | None, tuned: nn.Module):
        if base is None and not has_adapters(tuned):
            raise ValueError(
                "base_model=None runs the tuned model with its adapters off, but it has no adapters; pass the base model"
            )
        self.base, self.tuned = base, tuned

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor):
        base = _forward(self.tuned if self.base is None else self.base, ids, mask, adapters_off=self.base is None)
        return base, _forward(self.tuned, ids, mask, adapters_off=False)


# ----- the measurement --------------------------------------------------------------------------------------
@torch.inference_mode()
def measure_retention(
    base_model: nn.Module | None,
    tuned_model: nn.Module,
    tokenizer,
    texts: list[str],
    probes: list[Probe],
    batch_size: int = 8,
    *,
    max_length: int = 512,
    normalise: bool = False,
    progress: bool = False,
) -> RetentionReport:
    """Drift on ``texts`` and kept knowledge on ``probes`` of ``tuned_model`` against ``base_model``.

    ``base_model=None``: the base is ``tuned_model`` with its adapters off (``lorakit.disabled``), one loaded
    model for both. Passing the same model twice compares it with itself (KL 0, everything kept). Texts are
    cut to ``max_length`` tokens and run ``batch_size`` at a time, probe answers ``4 * batch_size`` at a time.
    ``normalise``: rank choices by their mean log-likelihood per token instead of the sum. ``progress``: a bar
    on stderr. Call it inside the precision's context (``precision.context(device)``) to compute in it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not texts or not probes:
        raise ValueError("measure_retention needs at least one text and one probe")
    sides = _Sides(base_model, tuned_model)
    models = [m for m in (base_model, tuned_model) if m is not None]
    training = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(tuned_model.parameters()).device
    pad = pad_id(tokenizer)
    rows = _text_rows(tokenizer, texts, max_length)
    sequences = _probe_sequences(tokenizer, probes)
    text_batches = range(0, len(rows), batch_size)
    probe_batches = range(0, len(sequences), 4 * batch_size)
    bar = _bar(len(text_batches) + len(probe_batches), progress)
    try:
        kl = agree = base_nll = tuned_nll = 0.0
        tokens = 0
        for start in text_batches:
            ids, mask = _pad(rows[start : start + batch_size], pad, device)
            (hb, head_b), (ht, head_t) = sides(ids, mask)
            valid = mask[:, 1:].bool()  # position t predicts token t + 1
            targets = ids[:, 1:][valid]
            hb, ht = hb[:, :-1][valid], ht[:, :-1][valid]
            for s in range(0, targets.numel(), CHUNK):
                lb, lt = _log_probs(hb[s : s + CHUNK], head_b), _log_probs(ht[s : s + CHUNK], head_t)
                kl += (lb.exp() * (lb - lt)).sum(-1).double().sum().item()
                agree += (lb.argmax(-1) == lt.argmax(-1)).sum().item()
                picked = targets[s : s + CHUNK, None]
                base_nll -= lb.gather(-1, picked).double().sum().item()
                tuned_nll -= lt.gather(-1, picked).double().sum().item()
            tokens += targets.numel()
            _tick(bar)
        scores = _score_probes(sides, sequences, pad, device, 4 * batch_size, normalise, bar)
    finally:
        if bar is not None:
            bar.close()
        for m, was in zip(models, training, strict=True):
            m.train(was)
    details = []
    for index, probe in enumerate(probes):
        base_scores, tuned_scores = zip(*(scores[(index, j)] for j in range(len(probe.choices))), strict=True)
        base_choice = max(range(len(base_scores)), key=base_scores.__getitem__)
        tuned_choice = max(range(len(tuned_scores)), key=tuned_scores.__getitem__)
        details.append(ProbeResult(probe.id, probe.question, probe.answer, base_choice, tuned_choice))
    base_right = sum(d.base_choice == d.answer for d in details)
    return RetentionReport(
        probes=len(probes),
        base_right=base_right,
        tuned_right=sum(d.tuned_choice == d.answer for d in details),
        kept=sum(d.base_choice == d.answer == d.tuned_choice for d in details),
        texts=len(rows),
        tokens=tokens,
        kl=kl / max(tokens, 1),
        agreement=agree / max(tokens, 1),
        base_loss=base_nll / max(tokens, 1),
        tuned_loss=tuned_nll / max(tokens, 1),
        details=details,
    )


def _text_rows(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text with two tokens or more (one next-token position), cut to ``max_length``; longest
    first, so that a batch holds texts of about one length (little padding)."""
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("every text is shorter than two tokens: nothing to compare")
    return sorted(rows, key=len, reverse=True)


def _probe_sequences(tokenizer, probes: list[Probe]) -> list[tuple[int, int, list[int], int]]:
    """(probe index, choice index, prompt + choice token ids, where the choice starts), longest first. The
    choice is tokenized on its own (with its leading space), so every choice follows the same prompt tokens."""
    found = []
    for index, probe in enumerate(probes):
        prompt = tokenizer(PROMPT.format(question=probe.question), add_special_tokens=True)["input_ids"]
        for j, choice in enumerate(probe.choices):
            answer = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            found.append((index, j, prompt + answer, len(prompt)))
    return sorted(found, key=lambda s: -len(s[2]))


def _score_probes(sides: _Sides, sequences, pad: int, device, batch_size: int, normalise: bool, bar) -> dict:
    """{(probe, choice): (base log-likelihood, tuned log-likelihood)} of each choice's tokens after its prompt."""
    scores = {}
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids, mask = _pad([s[2] for s in batch], pad, device)
        (hb, head_b), (ht, head_t) = sides(ids, mask)
        rows = torch.cat([torch.full((len(s[2]) - s[3],), i) for i, s in enumerate(batch)]).to(device)
        cols = torch.cat([torch.arange(s[3] - 1, len(s[2]) - 1) for s in batch]).to(device)  # predicting positions
        targets = ids[rows, cols + 1]
        sums = []
        for states, head in ((hb, head_b), (ht, head_t)):
            picked = torch.cat(
                [
                    _log_probs(states[rows[s : s + CHUNK], cols[s : s + CHUNK]], head)
                    .gather(-1, targets[s : s + CHUNK, None])
                    .squeeze(-1)
                    for s in range(0, rows.numel(), CHUNK)
                ]
            )
            total = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, picked.double())
            sums.append(total.nan_to_num(nan=-math.inf).tolist())  # a broken model's NaN never wins a ranking
        for i, (probe, choice, row, prompt_length) in enumerate(batch):
            length = len(row) - prompt_length if normalise else 1
            scores[(probe, choice)] = (sums[0][i] / length, sums[1][i] / length)
        _tick(bar)
    return scores


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="retention", unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)
