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
logit scaling, wrappers such as prompt tuning) keep the ordinary path: see ``supports_fused_loss``. A
``modules_to_save`` copy of the head is fused like the head itself.

Mixed precision (``lorakit.precision``): the head's products run in the dtype the model's own head would use,
autocast's under ``torch.autocast`` (a float32 ``modules_to_save`` head copy included, as autocast casts it),
the common dtype of the hidden states and head otherwise (bf16 for a pure bf16 model). Each chunk's logits
are then upcast and the log-softmax, cross-entropy and their gradient computed in float32, as transformers'
loss upcasts the logits before ``cross_entropy``; gradients of a head that trains are summed over the chunks
in float32 and handed back in the head's own dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .. import fastpath
from ..data import IGNORE  # the label of tokens without loss, as the data writes it
from ..layers import ModulesToSave
from ..precision import autocast_off, fast_path_dtype

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
    return fused_head(model) is not None


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` whose output is ``model``'s logits right now, or None where the logits are something
    else (see ``supports_fused_loss``). A ``modules_to_save`` head resolves to the copy its forward would run
    (the active adapter's, or the frozen original when disabled or none is active); routed rows, where each
    row may take another copy, keep the ordinary path."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or getattr(model.config, "is_encoder_decoder", False):
        return None
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _SCALED_LOGITS):
        return None
    head = model.get_output_embeddings()
    if isinstance(head, ModulesToSave):
        head = _saved_copy(head)
    return head if type(head) is nn.Linear else None


def _saved_copy(wrapper: ModulesToSave) -> nn.Module | None:
    """The module ``ModulesToSave.forward`` would call, or None where that depends on the row or is an error."""
    if wrapper.disabled:
        return wrapper.original_module
    if wrapper.routing is not None:
        return None
    names = [n for n in wrapper.active_adapters if n in wrapper.modules_to_save]
    if len(names) > 1:
        return None  # its forward raises; the ordinary path reports it
    return wrapper.modules_to_save[names[0]] if names else wrapper.original_module


@contextlib.contextmanager
def head_as_identity(model: nn.Module) -> Iterator[nn.Linear]:
    """Inside the block the model's forward returns its final hidden states where the logits would be; yields
    the linear layer that computes the logits (``fused_head``: for a ``modules_to_save`` head, its copy)."""
    head = model.get_output_embeddings()
    linear = fused_head(model)
    if linear is None:
        raise ValueError(f"{type(model).__name__}'s logits are not one linear layer's output; use its logits")
    model.set_output_embeddings(nn.Identity())
    try:
        yield linear
    finally:
        model.set_output_embeddings(head)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's products run in: autocast's while it is on (what the model's own head would
    compute in), else the common dtype of ``hidden`` and ``weight`` (the wider one where they differ)."""
    return fast_path_dtype(hidden, weight) or torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(hidden, weight, bias, rows, chunk):
    """(positions, their hidden rows in the weight's dtype, float32 logits) of ``rows`` of ``hidden`` through
    the head, ``chunk`` positions at a time. ``weight`` and ``bias`` are already in the compute dtype: the
    product runs in it and only then is upcast, as the model's own head under autocast rounds its logits.
    The logits may live in one reused buffer: consume each chunk before asking for the next."""
    buffer = None  # one chunk's float32 logits, reused: fresh 100 MB blocks cost page faults on every chunk
    for start in range(0, rows.numel(), chunk):
        index = rows[start : start + chunk]
        h = hidden.index_select(0, index).to(weight.dtype)
        if weight.dtype == torch.float32 and fastpath.uses_onednn(h, weight):
            logits = fastpath.linear(h, weight)  # oneDNN: faster even with a fresh block per chunk
        else:
            if buffer is None:
                buffer = hidden.new_empty((min(chunk, rows.numel()), weight.shape[0]), dtype=torch.float32)
            logits = buffer[: index.numel()]
            if weight.dtype == torch.float32:
                torch.mm(h, weight.T, out=logits)
            else:
                logits.copy_(h @ weight.T)
        if bias is not None:
            logits += bias
        yield index, h, logits


def _in_compute_dtype(hidden, weight, bias):
    """(compute dtype, the head's weight and bias in it): one cast per call, as autocast casts a float32
    head once per forward."""
    dtype = compute_dtype(hidden, weight)
    return dtype, weight.detach().to(dtype), (bias.detach().to(dtype) if bias is not None else None)


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
        want_h = ctx.needs_input_grad[0]
        want_w = ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dtype, w, b = _in_compute_dtype(hidden, weight, bias)  # read autocast's dtype before turning it off
        with autocast_off(hidden.device.type):  # every product's dtype is chosen here, not by autocast
            rows = (labels != IGNORE).nonzero().squeeze(1)
            for index, h, logits in _chunk_logits(hidden, w, b, rows, chunk):
                target = labels.index_select(0, index)
                logps, probs = _log_softmax_parts(logits, target)
                total -= logps.sum()
                if not (want_h or want_w or want_b):
                    continue
                probs[torch.arange(index.numel(), device=probs.device), target] -= 1  # d loss / d logits
                if want_b:
                    grad_b += probs.sum(0)
                probs = probs.to(dtype)  # the products of backward run in the compute dtype too
                if want_h:
                    grad_h.index_copy_(0, index, (probs @ w).to(hidden.dtype))
                if want_w:
                    grad_w += probs.T @ h  # summed over chunks in float32
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
        want_h = ctx.needs_input_grad[0]
        grad_h = torch.zeros_like(hidden) if want_h else None  # d log p / d hidden, per position
        out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        dtype, w, b = _in_compute_dtype(hidden, weight, bias)  # read autocast's dtype before turning it off
        with autocast_off(hidden.device.type):  # as in _LinearCrossEntropy
            rows = (labels != IGNORE).nonzero().squeeze(1)
            for index, _, logits in _chunk_logits(hidden, w, b, rows, chunk):
                target = labels.index_select(0, index)
                logps, probs = _log_softmax_parts(logits, target)
                out.index_copy_(0, index, logps)
                if want_h:
                    probs[torch.arange(index.numel(), device=probs.device), target] -= 1
                    grad_h.index_copy_(0, index, (probs.to(dtype) @ w).neg_().to(hidden.dtype))
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
    head = fused_head(inner)
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

    ``hidden``: (N, d); ``labels``: (N,). Returns a float32 scalar. The products run in ``compute_dtype``
    (autocast's under ``torch.autocast``), the log-softmax and cross-entropy in float32.
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
    take the ordinary path through their logits, with the same result. Under ``torch.autocast`` the head's
    product runs in autocast's dtype and the cross-entropy in float32, as the model's own logits and
    transformers' loss would (module docstring).

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
