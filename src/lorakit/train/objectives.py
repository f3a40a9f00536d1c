"""What a training step minimises: SFT's token loss, or a preference loss over (chosen, rejected) pairs.

Preference tuning on LoRA needs no second model. DPO's reference is the trained model with its adapter
switched off: the base model (``lorakit.disabled``) or, with ``dpo.reference_adapter``, the base with a frozen
SFT adapter that the trained adapter sits on top of (``lorakit.switched_off``). It runs under no_grad in eval
mode, so its log-probabilities are a fixed function of the pair; ``dpo.precompute_reference`` computes them
once before the first step.

Definitions, the same as TRL's DPOTrainer and ORPOTrainer (tests compare them on the same batch and weights).
``log pi(y|x)`` is the sum of the answer tokens' log-probabilities (prompt and padding excluded):

- DPO, sigmoid: ``d = [log pi(c) - log ref(c)] - [log pi(r) - log ref(r)]``, loss
  ``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)`` (eps: label smoothing, conservative DPO).
- IPO: ``(d_c / n_c - d_r / n_r - 1 / (2 beta))^2`` with the log-ratios divided by the answers' token counts.
- ``dpo.sft_weight`` w adds ``w x NLL(chosen)``, the chosen answers' mean token NLL (RPO; TRL's "sft" loss).
- Rewards ``beta [log pi(y) - log ref(y)]``; margin = chosen - rejected reward; accuracy = share of pairs whose
  chosen reward is larger (a tie counts as wrong, so it is 0 before training).
- ORPO (reference-free): ``NLL(chosen) - lambda log sigmoid(log odds(c) - log odds(r))`` with
  ``log odds(y) = m - log(1 - exp(m))``, ``m`` the answer's mean token log-probability, lambda = dpo.beta.
  The NLL is over the chosen answers' tokens (TRL's covers the prompt too); rewards are ``lambda m``.

Each step's loss is the mean over the global batch (pairs; chosen tokens for ORPO's NLL), whatever the
split over processes and micro-batches, as for SFT.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import disabled, switched_off
from ..data import IGNORE, Example, PreferencePair, collate_pairs
from ..state import registry
from . import distributed as dist
from .config import RunConfig
from .evaluate import token_loss_sum
from .fused_loss import causal_token_logps
from .tasks import TASKS

REFERENCE = "reference"
"""Name of the frozen reference adapter (dpo.reference_adapter) on the trained model."""
TRAINED = "default"


# ----- the losses, on per-sequence log-probabilities ---------------------------------------------------
def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from summed answer log-probabilities (shape (pairs,));
    IPO also needs the answers' token counts."""
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    if loss_type == "sigmoid":
        d = beta * (chosen - rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type=ipo needs chosen_tokens and rejected_tokens (answer lengths)")
        d = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: use sigmoid or ipo")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log sigmoid of the log odds ratio, the log odds ratio) per pair, from mean token log-probabilities."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return F.logsigmoid(log_odds), log_odds


# ----- scoring sequences --------------------------------------------------------------------------------
def sequence_logps(model: nn.Module, inner: nn.Module, batch: dict[str, torch.Tensor]):
    """(summed answer log-probabilities, answer token counts), one per row of a collated pair batch."""
    token_logps = causal_token_logps(model, inner, batch)
    counts = batch["labels"][:, 1:].ne(IGNORE).sum(1)
    return token_logps.sum(1), counts


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[None]:
    """The reference model: the trained adapter off (the frozen reference adapter, if any, on), eval mode,
    no_grad. The weights are shared with the trained model: no second copy."""
    was_training = model.training
    has_reference = REFERENCE in registry(model).adapters
    off = switched_off(model, TRAINED) if has_reference else disabled(model)
    model.eval()
    try:
        with torch.no_grad(), off:
            yield
    finally:
        model.train(was_training)


def reference_logps(model: nn.Module, pairs: list[PreferencePair], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference's summed answer log-probabilities, (2 x pairs,) in the batch's order: the precomputed
    values where every pair has them, else one reference forward pass."""
    if all(p.reference is not None for p in pairs):
        values = [p.reference[0] for p in pairs] + [p.reference[1] for p in pairs]
        return torch.tensor(values, dtype=torch.float32, device=batch["input_ids"].device)
    with reference_mode(model):
        return sequence_logps(model, model, batch)[0]


def precompute_reference(
    model: nn.Module, pairs: list[PreferencePair], pad: int, ctx: dist.Context, batch_size: int, progress: bool
) -> None:
    """Fill in ``pair.reference`` for every pair: each process scores its share (all take the same number of
    forward passes, as a sharded model needs), then the values are summed across processes."""
    values = torch.zeros((len(pairs), 2), dtype=torch.float64)
    mine = list(range(ctx.rank, len(pairs), ctx.world_size))
    rounds = math.ceil(math.ceil(len(pairs) / ctx.world_size) / batch_size)
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds, desc="reference log-probs", unit="batch", dynamic_ncols=True)
    for k in range(rounds):
        chunk = mine[k * batch_size : (k + 1) * batch_size]
        index = chunk or [0]  # a process out of pairs still takes part in the forward pass (FSDP), discarded
        batch = {n: v.to(ctx.device) for n, v in collate_pairs([pairs[i] for i in index], pad).items()}
        with reference_mode(model):
            sums = sequence_logps(model, model, batch)[0].double().cpu()
        if chunk:
            values[chunk, 0], values[chunk, 1] = sums[: len(chunk)], sums[len(chunk) :]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    values = dist.all_reduce_sum(values.to(ctx.device), ctx).cpu()
    for pair, (c, r) in zip(pairs, values.tolist(), strict=True):
        pair.reference = (c, r)


# ----- objectives ---------------------------------------------------------------------------------------
class SFT:
    """Next-token loss on the labelled tokens (the task's loss for seq2seq and classification)."""

    name = "sft"
    metrics: tuple[str, ...] = ()

    def __init__(self, cfg: RunConfig) -> None:
        self.task = TASKS[cfg.task]

    def units(self, examples: list[Example]) -> dict[str, int]:
        return {"tokens": sum(self.task.units(e) for e in examples)}

    def processed(self, examples: list[Example]) -> int:
        return sum(len(e.input_ids) for e in examples)

    def loss(self, wrapped, model, examples, pad, device, units) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the step's mean loss, and its metric sums (none for SFT)."""
        batch = {key: v.to(device) for key, v in self.task.collate(examples, pad).items()}
        part, _ = token_loss_sum(wrapped, batch, self.task)
        return part / max(units["tokens"], 1), {}

    def summarize(self, sums: dict[str, float], units: dict[str, int]) -> dict[str, float]:
        return {}


class Preference(SFT):
    """Shared by DPO and ORPO: pairs in, one forward pass over [chosen; rejected], per-pair metrics."""

    metrics = ("rewards_chosen", "rewards_rejected", "margin", "accuracy", "prefers_chosen")
    nll_weight = 0.0  # weight of the chosen answers' mean token NLL in the loss

    def __init__(self, cfg: RunConfig) -> None:
        self.dpo = cfg.dpo

    def units(self, pairs: list[PreferencePair]) -> dict[str, int]:
        chosen = sum(sum(label != IGNORE for label in p.chosen.labels[1:]) for p in pairs)
        return {"pairs": len(pairs), "chosen_tokens": chosen}

    def processed(self, pairs: list[PreferencePair]) -> int:
        return sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)

    def loss(self, wrapped, model, pairs, pad, device, units):
        batch = {key: v.to(device) for key, v in collate_pairs(pairs, pad).items()}
        policy, counts = sequence_logps(wrapped, model, batch)
        n = len(pairs)
        losses, rewards_c, rewards_r, extra = self.pair_losses(model, pairs, batch, policy, counts)
        sums = {
            "rewards_chosen": rewards_c.sum(),
            "rewards_rejected": rewards_r.sum(),
            "margin": (rewards_c - rewards_r).sum(),
            "accuracy": (rewards_c > rewards_r).float().sum(),
            "prefers_chosen": (policy[:n] > policy[n:]).float().sum().detach(),
            **{k: v.detach() for k, v in extra.items()},
        }
        loss = losses.sum() / max(units["pairs"], 1)
        if self.nll_weight:
            nll_sum = -policy[:n].sum()
            sums["nll"] = nll_sum.detach()
            loss = loss + self.nll_weight * nll_sum / max(units["chosen_tokens"], 1)
        return loss, sums

    def summarize(self, sums: dict[str, float], units: dict[str, int]) -> dict[str, float]:
        pairs = max(units["pairs"], 1)
        out = {k: v / pairs for k, v in sums.items() if k != "nll"}
        if "nll" in sums:
            out["nll"] = sums["nll"] / max(units["chosen_tokens"], 1)
        return out


class DPO(Preference):
    name = "dpo"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.nll_weight = cfg.dpo.sft_weight
        if self.nll_weight:
            self.metrics = (*Preference.metrics, "nll")

    def pair_losses(self, model, pairs, batch, policy, counts):
        """(loss per pair, chosen rewards, rejected rewards, extra metric sums) from the policy's summed answer
        log-probabilities and token counts, (2 x pairs,) each."""
        reference = reference_logps(model, pairs, batch)
        n = len(pairs)
        losses, rewards_c, rewards_r = dpo_loss(
            policy[:n], policy[n:], reference[:n], reference[n:], beta=self.dpo.beta, loss_type=self.dpo.loss_type,
            label_smoothing=self.dpo.label_smoothing, chosen_tokens=counts[:n], rejected_tokens=counts[n:],
        )  # fmt: skip
        return losses, rewards_c, rewards_r, {}


class ORPO(Preference):
    name = "orpo"
    metrics = (*Preference.metrics, "nll", "log_odds_ratio")
    nll_weight = 1.0

    def pair_losses(self, model, pairs, batch, policy, counts):
        n = len(pairs)
        means = policy / counts.clamp(min=1)
        ratio, log_odds = orpo_odds_ratio(means[:n], means[n:])
        beta = self.dpo.beta
        extra = {"log_odds_ratio": log_odds.detach().sum()}
        return -beta * ratio, beta * means[:n].detach(), beta * means[n:].detach(), extra


OBJECTIVES = {o.name: o for o in (SFT, DPO, ORPO)}


def objective_for(cfg: RunConfig) -> SFT:
    return OBJECTIVES[cfg.objective](cfg)


# ----- evaluation ---------------------------------------------------------------------------------------
@dataclass
class PreferenceEval:
    """Held-out pairs: the loss and the metrics of the step records. ``accuracy`` is the reward accuracy (0
    before training, when every reward is 0); ``prefers_chosen`` the share of pairs whose chosen answer the
    model itself finds more likely (summed log-probabilities), meaningful before training too."""

    loss: float
    metrics: dict[str, float]
    pairs: int

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    @property
    def prefers_chosen(self) -> float:
        return self.metrics["prefers_chosen"]

    def as_record(self) -> dict:
        return {"loss": self.loss, **self.metrics, "pairs": self.pairs}

    def versus(self, before: PreferenceEval) -> str:
        return (
            f"model prefers the chosen answer: {100 * before.prefers_chosen:.1f}% before -> "
            f"{100 * self.prefers_chosen:.1f}% after; reward accuracy {100 * self.accuracy:.1f}% of {self.pairs} pairs"
        )

    def describe(self, when: str) -> str:
        return (
            f"eval {when}: loss {self.loss:.4f}, reward accuracy {100 * self.accuracy:.1f}%, margin "
            f"{self.metrics['margin']:.3f}, model prefers chosen {100 * self.prefers_chosen:.1f}% of {self.pairs} pairs"
        )


def evaluate_pairs(
    objective: Preference,
    model: nn.Module,
    pairs: list[PreferencePair],
    pad: int,
    batch_size: int = 8,
    ctx: dist.Context | None = None,
    lockstep: bool = False,
) -> PreferenceEval:
    """The objective's loss and metrics over held-out ``pairs`` (eval mode, no gradients), ``batch_size`` pairs
    per forward pass. Under torchrun (``ctx``) each process scores every ``world_size``-th pair and the sums are
    added across processes, as ``evaluate`` does; ``lockstep`` (FSDP): every process runs as many forwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use at least 1 pair per forward pass")
    ctx = ctx or dist.Context()
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters() if not p.is_meta).device
    units = objective.units(pairs)  # of all the pairs: each process's loss is its share of the mean
    mine = pairs[ctx.rank :: ctx.world_size]
    share = math.ceil(len(pairs) / ctx.world_size) if lockstep else len(mine)
    sums = torch.zeros(1 + len(objective.metrics), dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, share, batch_size):
            chunk = mine[start : start + batch_size]
            loss, part = objective.loss(model, model, chunk or pairs[:1], pad, device, units)
            if chunk:  # else only in step with the other processes (lockstep)
                sums += torch.stack([loss.double(), *(part[m].double() for m in objective.metrics)])
    model.train(was_training)
    total, *values = dist.all_reduce_sum(sums.to(ctx.device), ctx).tolist()
    return PreferenceEval(
        total, objective.summarize(dict(zip(objective.metrics, values, strict=True)), units), len(pairs)
    )


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout layer's probability to 0 (LoRA's included); returns how many there were."""
    layers = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for m in layers:
        m.p = 0.0
    return len(layers)
