"""Causal-LM loss without the full logits tensor: output head and cross-entropy fused, in chunks.

For a small model the output head dominates training memory: 8 x 128 tokens x 49,152 vocabulary entries
is 200 MB of float32 logits, kept for backward along with as much again for their gradient and the
softmax. Here the model runs with its head swapped for the identity, so its forward returns the final
hidden states; the loss then walks over the *labelled* positions in chunks, computing each chunk's logits,
its cross-entropy and, at once, the gradient with respect to the hidden states (and to the head's weight
and bias when they train). Backward only scales the stored gradients. Peak memory for the head drops to
one chunk's logits, and unlabelled positions (prompts, padding) never meet the head at all.

Same maths as ``F.cross_entropy(logits, labels, reduction="sum")`` on the model's own logits (tested to
float tolerance, loss and gradients). Models whose head is not a plain linear layer (logit soft-capping,
logit scaling, wrappers such as prompt tuning) keep the ordinary path: see ``supports_fused_loss``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .. import fastpath

IGNORE = -100
CHUNK = 512  # labelled positions per chunk: 512 x 49,152 float32 logits = 100 MB at a time
_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def forward_inputs(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for ``batch``: input ids and mask, and for packed rows (``data.pack``) the
    position ids and the block-diagonal mask: boolean (one byte per pair) for sdpa attention, which reads it as
    "may attend"; an additive mask in the model's floating dtype for any other attention (eager attention adds
    the mask to the scores, so a boolean one there would be wrong)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        mask = batch["attention_mask"]
        if getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa":
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        inputs["attention_mask"] = mask
        inputs["position_ids"] = batch["position_ids"]
    return inputs


def supports_fused_loss(model: nn.Module) -> bool:
    """True for transformers causal LMs whose logits are exactly ``head(hidden_states)`` with a linear head."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or getattr(model.config, "is_encoder_decoder", False):
        return False
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _SCALED_LOGITS):
        return False
    head = model.get_output_embeddings()
    return type(head) is nn.Linear


@contextlib.contextmanager
def head_as_identity(model: nn.Module) -> Iterator[nn.Linear]:
    """Inside the block the model's forward returns its final hidden states where the logits would be."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


def _chunk_logits(hidden, weight, bias, rows, chunk):
    """(positions, float32 logits) of ``rows`` of ``hidden`` through the head, ``chunk`` positions at a time.
    The logits may live in one reused buffer: consume each chunk before asking for the next."""
    buffer = None  # one chunk's float32 logits, reused: fresh 100 MB blocks cost page faults on every chunk
    for start in range(0, rows.numel(), chunk):
        index = rows[start : start + chunk]
        h = hidden.index_select(0, index)
        if weight.dtype == torch.float32 and fastpath.uses_onednn(h, weight):
            logits = fastpath.linear(h, weight)  # oneDNN: faster even with a fresh block per chunk
        elif weight.dtype == torch.float32:
            if buffer is None:
                buffer = hidden.new_empty((min(chunk, rows.numel()), weight.shape[0]), dtype=torch.float32)
            logits = torch.mm(h.float(), weight.T, out=buffer[: index.numel()])
        else:
            logits = (h @ weight.T).float()
        if bias is not None:
            logits += bias.float()
        yield index, h, logits


def _log_softmax_parts(logits, target):
    """(log-probability of ``target`` in each row, the rows' softmax), from one exponential pass over
    ``logits``, in place: the returned softmax is ``logits`` itself."""
    top = logits.amax(dim=1, keepdim=True)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    sums = logits.sub_(top).exp_().sum(dim=1)
    return picked - top.squeeze(1) - sums.log(), logits.div_(sums[:, None])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):
        rows = (labels != IGNORE).nonzero().squeeze(1)
        want_h = ctx.needs_input_grad[0]
        want_w = ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for index, h, logits in _chunk_logits(hidden, weight, bias, rows, chunk):
            target = labels.index_select(0, index)
            logps, probs = _log_softmax_parts(logits, target)
            total -= logps.sum()
            if want_h or want_w or want_b:
                probs[torch.arange(index.numel(), device=probs.device), target] -= 1  # d loss / d logits
                if want_h:
                    grad_h.index_copy_(0, index, (probs.to(weight.dtype) @ weight).to(hidden.dtype))
                if want_w:
                    grad_w += probs.T @ h.float()
                if want_b:
                    grad_b += probs.sum(0)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.wanted = (want_h, want_w, want_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        want_h, want_w, want_b = ctx.wanted
        return (
            grad_h * grad_out if want_h else None,
            (grad_w * grad_out).to(ctx.weight_dtype) if want_w else None,
            (grad_b * grad_out).to(ctx.bias_dtype) if want_b else None,
            None,
            None,
        )


class _LinearLogProbs(torch.autograd.Function):
    """Per-position log-probabilities of the labels (0 where unlabelled), head fused as above; the head itself
    stays frozen (its gradient would depend on how the positions are weighted, known only in backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):
        rows = (labels != IGNORE).nonzero().squeeze(1)
        want_h = ctx.needs_input_grad[0]
        grad_h = torch.zeros_like(hidden) if want_h else None  # d log p / d hidden, per position
        out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        for index, _, logits in _chunk_logits(hidden, weight, bias, rows, chunk):
            target = labels.index_select(0, index)
            logps, probs = _log_softmax_parts(logits, target)
            out.index_copy_(0, index, logps)
            if want_h:
                probs[torch.arange(index.numel(), device=probs.device), target] -= 1
                grad_h.index_copy_(0, index, (probs.to(weight.dtype) @ weight).neg_().to(hidden.dtype))
        ctx.save_for_backward(grad_h if want_h else torch.empty(0))
        ctx.want_h = want_h
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out[:, None].to(grad_h.dtype) if ctx.want_h else None), None, None, None, None


def causal_token_logps(
    model: nn.Module, inner: nn.Module, batch: dict[str, torch.Tensor], chunk: int = CHUNK
) -> torch.Tensor:
    """Log-probability of each labelled next token, (batch, length - 1) float32, 0 where ``labels`` is -100.

    Position t holds log p(labels[t + 1] | tokens up to t). With a plain linear head that does not train
    (``supports_fused_loss``), the head runs fused in chunks over the labelled positions only, as for the loss
    above; otherwise through the model's logits. ``model`` is what to call (a DDP wrapper, say), ``inner`` the
    transformers model inside it.
    """
    labels = batch["labels"][:, 1:]
    head = inner.get_output_embeddings() if supports_fused_loss(inner) else None
    if head is not None and not any(p.requires_grad for p in head.parameters()):
        with head_as_identity(inner):
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return _LinearLogProbs.apply(hidden, head.weight, head.bias, labels.reshape(-1), chunk).view(labels.shape)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return picked.masked_fill(labels == IGNORE, 0.0)


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """Sum over positions with ``labels != -100`` of the cross-entropy of ``hidden @ weight.T + bias``.

    ``hidden``: (N, d); ``labels``: (N,). Returns a float32 scalar.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, d) and labels (N,), got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk)


def causal_loss_sum(
    model: nn.Module, inner: nn.Module, batch: dict[str, torch.Tensor], chunk: int = CHUNK
) -> torch.Tensor:
    """Next-token loss summed over labelled tokens, without materialising the logits.

    ``model`` is what to call (a DDP wrapper, say), ``inner`` the transformers model inside it.
    """
    with head_as_identity(inner) as head:
        hidden = model(**forward_inputs(batch, inner)).logits
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = batch["labels"][:, 1:].reshape(-1)
    return linear_cross_entropy_sum(hidden, head.weight, head.bias, labels, chunk)


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM, averaged over labelled positions, for your own training loop.

    The same value as transformers' ``model(input_ids, attention_mask=..., labels=labels).loss``: position t
    predicts ``labels[:, t + 1]``, and labels of -100 (prompts, padding) carry no loss. Where the model allows
    it (``supports_fused_loss``: a transformers causal LM with a plain linear head) the output head and the
    cross-entropy run fused in chunks of ``chunk`` labelled positions, so the (batch, length, vocabulary)
    logits tensor never exists: less memory and a faster step than ``.loss`` (BENCHMARKS.md). Other models
    take the ordinary path through their logits, with the same result.

    Args:
        model: a causal LM, or a ``DistributedDataParallel`` wrapper of one.
        input_ids: (batch, length) token ids.
        labels: (batch, length) target ids, usually ``input_ids`` with -100 where no loss applies.
        attention_mask: (batch, length) 1 for real tokens, 0 for padding; None means all ones.

    Returns:
        A float32 scalar. A batch without any labelled position gives NaN, as ``F.cross_entropy`` does.

    Raises:
        ValueError: ``labels`` or ``attention_mask`` is not shaped like ``input_ids``.
    """
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(
            f"input_ids must be (batch, length) and labels the same shape, got {tuple(input_ids.shape)} and "
            f"{tuple(labels.shape)}; use labels=input_ids (with -100 where no loss applies)"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be shaped like input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    inner = getattr(model, "module", model)
    count = labels[:, 1:].ne(IGNORE).sum()
    if supports_fused_loss(inner):
        return causal_loss_sum(model, inner, batch, chunk=chunk) / count
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return (
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        / count
    )
