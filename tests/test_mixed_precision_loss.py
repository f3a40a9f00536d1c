"""The fused head + cross-entropy under mixed precision (issue 28): bf16 products, float32 softmax, no fallback.

The reference is what a model's own head and transformers' loss do: the logits from the model's forward under
``torch.autocast`` (a bf16 product), upcast to float32 for ``F.cross_entropy``. The fused path must give the same
loss and gradients within bf16 rounding, under autocast (a bf16 base with float32 adapters, with a float32
``modules_to_save`` head copy, a full fine-tune) and without it (a pure bf16 model), on both CPU GEMM choices,
and must not fall back to the logits path where it applies.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.train.fused_loss import (
    causal_loss_sum,
    causal_token_logps,
    compute_dtype,
    fused_head,
    linear_cross_entropy_sum,
    supports_fused_loss,
)
from lorakit.train.tasks import CausalLM

from .conftest import FAMILIES, randomize_adapters

BF16_TOL = 2e-2  # relative (norm) error allowed between two bf16 computations of the same quantity


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = BF16_TOL) -> None:
    """``got`` equals ``want`` to ``tol`` in relative norm: bf16 rounding moves single entries too much for an
    elementwise check, not the whole tensor."""
    assert got.dtype == want.dtype and got.shape == want.shape
    error = float((got.detach().float() - want.detach().float()).norm() / want.detach().float().norm().clamp(min=1e-12))
    assert error < tol, f"relative error {error:.3g} >= {tol}"


def _batch(seed: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt without loss
    labels[2, 7:] = -100  # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _float32_trained(model: torch.nn.Module) -> None:
    """What mixed precision trains: every trainable tensor in float32 over the low-precision base (set here
    directly, whatever inject's default)."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def _model(setup: str, name: str = "llama") -> tuple[torch.nn.Module, bool]:
    """(model, whether it runs under autocast) for a precision setup:

    - ``mixed``: bf16 base, float32 LoRA (bf16-mixed);
    - ``mixed-saved-head``: bf16 base, float32 LoRA and a float32 ``modules_to_save`` copy of the head;
    - ``mixed-full``: full fine-tuning of a bf16 model under autocast (the head's bf16 weight trains);
    - ``bf16``: everything bf16, no autocast (precision bf16);
    - ``bf16-saved-head``: as ``bf16`` with a bf16 head copy that trains.
    """
    family = FAMILIES[name]
    model = family.build(dtype=torch.bfloat16)
    if setup == "mixed-full":
        model.requires_grad_(True)
        return model, True
    saved = ["lm_head"] if setup.endswith("saved-head") else None
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets, modules_to_save=saved))
    randomize_adapters(model)
    if saved:
        with torch.no_grad():  # the copy differs from the frozen original: the test sees which one ran
            copy = model.lm_head.modules_to_save["default"].weight
            copy.add_(torch.randn(copy.shape, generator=torch.Generator().manual_seed(9)).to(copy.dtype) * 0.05)
    if setup.startswith("mixed"):
        _float32_trained(model)
    return model, setup.startswith("mixed")


def _reference_loss(model, batch, autocast: bool) -> torch.Tensor:
    with _autocast(autocast):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = logits[:, :-1]
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return grads


SETUPS = ["mixed", "mixed-saved-head", "mixed-full", "bf16", "bf16-saved-head"]


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("chunk", [4, 512])
def test_fused_loss_equals_the_models_logits_and_float32_cross_entropy(setup, chunk, cpu_gemm):
    model, autocast = _model(setup)
    model.train()  # no dropout in the tiny LLaMA: both forwards see the same network
    batch = _batch()
    assert supports_fused_loss(model)
    with _autocast(autocast):
        fused = causal_loss_sum(model, model, batch, chunk=chunk)
    fused.backward()
    fused_grads = _grads(model)
    reference = _reference_loss(model, batch, autocast)
    reference.backward()
    assert fused.dtype == torch.float32
    _close(fused, reference.detach(), tol=5e-3)
    trained = [p for p in model.parameters() if p.requires_grad]
    for param, got, want in zip(trained, fused_grads, _grads(model), strict=True):
        assert got.dtype == param.dtype  # float32 tensors get float32 gradients, bf16 ones bf16
        _close(got, want)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 512])
def test_linear_cross_entropy_under_autocast_takes_a_float32_head_to_bf16(bias, chunk, cpu_gemm):
    """A float32 head (a modules_to_save copy) over bf16 hidden states: the product in bf16, as autocast casts
    the model's own head; the softmax in float32; gradients back in each tensor's own dtype."""
    torch.manual_seed(0)
    hidden = torch.randn(90, 24).to(torch.bfloat16).requires_grad_()  # > 32 rows: oneDNN's size, were it float32
    weight = (torch.randn(50, 24) * 0.3).requires_grad_()
    b = torch.randn(50, requires_grad=True) if bias else None
    labels = torch.tensor([1, -100, 3, 49, 0, -100, -100, 5, 2, 7] * 9)
    leaves = [hidden, weight] + ([b] if bias else [])
    with _autocast(True):
        assert compute_dtype(hidden, weight) == torch.bfloat16
        ours = linear_cross_entropy_sum(hidden, weight, b, labels, chunk=chunk)
    (ours * 0.5).backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    with _autocast(True):
        logits = F.linear(hidden, weight, b)
    assert logits.dtype == torch.bfloat16
    reference = F.cross_entropy(logits.float(), labels, reduction="sum")
    (reference * 0.5).backward()
    _close(ours, reference.detach(), tol=5e-3)
    for leaf, got in zip(leaves, grads, strict=True):
        assert got.dtype == leaf.dtype
        _close(got, leaf.grad)
    assert hidden.grad[1].abs().sum() == 0  # ignored positions get no gradient


def test_the_head_product_runs_in_the_autocast_dtype():
    """Under autocast the fused loss equals cross-entropy on bf16-rounded logits, and not on float32 ones: the
    head's product ran in bf16, as the model's own head would have (a float32 product would be more exact than
    the reference, and slower)."""
    torch.manual_seed(1)
    hidden = torch.randn(40, 64)
    weight = torch.randn(300, 64)
    labels = torch.randint(0, 300, (40,))
    with _autocast(True):
        ours = linear_cross_entropy_sum(hidden, weight, None, labels)
    as_bf16 = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().T).float(), labels, reduction="sum")
    as_float32 = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    assert abs(float(ours - as_bf16)) < 1e-3 * abs(float(as_bf16))
    assert abs(float(ours - as_bf16)) < abs(float(ours - as_float32))
    assert compute_dtype(hidden, weight) == torch.float32  # outside autocast: the tensors' own dtype


@pytest.mark.parametrize("setup", ["mixed", "mixed-saved-head", "bf16"])
@pytest.mark.parametrize("chunk", [2, 512])
def test_token_logps_under_mixed_precision_match_the_log_softmax_of_float32_logits(setup, chunk, cpu_gemm):
    model, autocast = _model(setup)
    if setup == "mixed-saved-head":
        model.lm_head.modules_to_save["default"].requires_grad_(False)  # a frozen head: the fused path's case
    batch = _batch()
    weights = torch.linspace(-1.0, 2.0, 3 * 8).view(3, 8)
    with _autocast(autocast):
        fused = causal_token_logps(model, model, batch, chunk=chunk)
    (fused * weights).sum().backward()
    fused_grads = _grads(model)
    with _autocast(autocast):
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    plain = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * labels.ne(-100)
    (plain * weights).sum().backward()
    assert fused.dtype == torch.float32 and (fused[labels == -100] == 0).all()
    _close(fused, plain.detach(), tol=5e-3)
    for got, want in zip(fused_grads, _grads(model), strict=True):
        _close(got, want)


class _HeadCalls:
    """Counts calls of the output head (the wrapper and every linear inside it): the fused path never calls it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        head = model.get_output_embeddings()
        self.handles = [m.register_forward_hook(self._hook) for m in head.modules()]

    def _hook(self, *_) -> None:
        self.calls += 1


@pytest.mark.parametrize("setup", ["mixed", "mixed-saved-head", "mixed-full", "bf16"])
def test_the_fused_path_runs_under_mixed_precision_and_never_falls_back_to_the_logits(setup):
    model, autocast = _model(setup)
    batch = _batch()
    assert fused_head(model) is not None
    spy = _HeadCalls(model)
    with _autocast(autocast):
        CausalLM().train_loss_sum(model, batch).backward()  # the trainer's entry point
        lorakit.causal_lm_loss(model, batch["input_ids"], batch["labels"])
    assert spy.calls == 0, "the loss went through the model's logits instead of the fused head"
    model.requires_grad_(False)  # the log-probabilities fuse a frozen head (preference tuning's reference model)
    with _autocast(autocast), torch.no_grad():
        causal_token_logps(model, model, batch)
    assert spy.calls == 0, "the log-probabilities went through the model's logits instead of the fused head"
    with _autocast(autocast), torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert spy.calls > 0  # the spy does see the head when the logits are computed


def test_a_modules_to_save_head_fuses_the_copy_that_would_run():
    model, _ = _model("mixed-saved-head")
    wrapper = model.lm_head
    assert fused_head(model) is wrapper.modules_to_save["default"]
    with lorakit.disabled(model):
        assert fused_head(model) is wrapper.original_module
    wrapper.active_adapters = []
    assert fused_head(model) is wrapper.original_module
    wrapper.add_adapter("other")
    wrapper.active_adapters = ["default", "other"]
    assert fused_head(model) is None  # its forward would refuse: the ordinary path reports it
