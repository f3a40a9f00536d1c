"""The fused head + cross-entropy gives the ordinary loss and gradients without the logits tensor."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lorakit
from lorakit.train.fused_loss import (
    causal_loss_sum,
    causal_token_logps,
    linear_cross_entropy_sum,
    supports_fused_loss,
)
from lorakit.train.tasks import CausalLM

from .conftest import FAMILIES, randomize_adapters


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 40, 512])
def test_linear_cross_entropy_matches_cross_entropy(bias, chunk, cpu_gemm):
    torch.manual_seed(0)
    hidden = torch.randn(90, 6, requires_grad=True)  # chunks of more than 32 rows take the oneDNN path
    weight = torch.randn(11, 6, requires_grad=True)
    b = torch.randn(11, requires_grad=True) if bias else None
    labels = torch.tensor([1, -100, 3, 10, 0, -100, -100, 5, 2, 7] * 9)
    ours = linear_cross_entropy_sum(hidden, weight, b, labels, chunk=chunk)
    (ours * 0.5).backward()
    grads = [hidden.grad.clone(), weight.grad.clone()] + ([b.grad.clone()] if bias else [])
    for t in [hidden, weight] + ([b] if bias else []):
        t.grad = None
    ref = F.cross_entropy(F.linear(hidden, weight, b), labels, ignore_index=-100, reduction="sum")
    (ref * 0.5).backward()
    assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, [hidden.grad, weight.grad] + ([b.grad] if bias else []), strict=True):
        assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert hidden.grad[1].abs().sum() == 0  # ignored positions get no gradient


def test_frozen_head_gets_no_gradient_and_all_ignored_gives_zero():
    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(5, 3)
    loss = linear_cross_entropy_sum(hidden, weight, None, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().sum() == 0 and weight.grad is None
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy_sum(hidden, weight, None, torch.zeros(3, dtype=torch.long))


def _batch():
    ids = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt without loss
    labels[2, 7:] = -100  # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_causal_loss_matches_logits_path_for_lora(name):
    family = FAMILIES[name]
    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets, init="random"))
    randomize_adapters(model)
    assert supports_fused_loss(model)
    batch, task = _batch(), CausalLM()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = causal_loss_sum(model, model, batch)
    fused.backward()
    fused_grads = [p.grad.clone() for p in params]
    model.zero_grad()
    plain = task.loss_sum(task.logits(model, batch), batch)
    plain.backward()
    assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, [p.grad for p in params], strict=True):
        assert_close(a, b, rtol=1e-4, atol=3e-5)
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # the head is back in place


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [2, 512])
def test_token_logps_match_the_log_softmax_of_the_logits_values_and_weighted_gradients(name, chunk, cpu_gemm):
    """The per-token log-probabilities of preference tuning (fused head) against log_softmax on the model's logits,
    with a backward that weights each position differently (as DPO's per-pair weights do)."""
    family = FAMILIES[name]
    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets, init="random"))
    randomize_adapters(model)
    batch = _batch()
    weights = torch.linspace(-1.0, 2.0, 3 * 8).view(3, 8)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = causal_token_logps(model, model, batch, chunk=chunk)
    (fused * weights).sum().backward()
    fused_grads = [p.grad.clone() for p in params]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    plain = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * labels.ne(-100)
    (plain * weights).sum().backward()
    assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert (fused[labels == -100] == 0).all()
    for a, b in zip(fused_grads, [p.grad for p in params], strict=True):
        assert_close(a, b, rtol=1e-4, atol=3e-5)
    with torch.no_grad():  # the reference's pass: no gradient kept
        assert_close(causal_token_logps(model, model, batch, chunk=chunk), plain.detach(), rtol=1e-5, atol=1e-5)


def test_full_fine_tuning_trains_the_head_too():
    family = FAMILIES["llama"]
    model = family.build()
    model.train()
    batch, task = _batch(), CausalLM()
    causal_loss_sum(model, model, batch).backward()
    head_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    task.loss_sum(task.logits(model, batch), batch).backward()
    assert_close(head_grad, model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def test_unsupported_models_keep_the_ordinary_path():
    assert not supports_fused_loss(FAMILIES["t5"].build())
    assert not supports_fused_loss(FAMILIES["bert"].build())
    model = FAMILIES["llama"].build()
    model.config.final_logit_softcapping = 30.0
    assert not supports_fused_loss(model)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [4, 512])
def test_public_causal_lm_loss_equals_cross_entropy_on_the_logits(name, chunk):
    family = FAMILIES[name]
    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets, init="random"))
    randomize_adapters(model)  # eval mode: GPT-2's own dropout would make the two forwards differ
    batch = _batch()
    batch["attention_mask"][2, 7:] = 0
    params = [p for p in model.parameters() if p.requires_grad]
    loss = lorakit.causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"], chunk=chunk)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    reference.backward()
    assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, [p.grad for p in params], strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-6)
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert_close(loss, hf, rtol=1e-5, atol=1e-6)  # transformers' own .loss gives the same number


def test_public_causal_lm_loss_takes_the_ordinary_path_where_fusing_does_not_apply():
    model = FAMILIES["llama"].build()
    model.config.final_logit_softcapping = 30.0  # logits are not head(hidden): no fused path
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    loss = lorakit.causal_lm_loss(model, ids, ids)
    logits = model(input_ids=ids).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    assert lorakit.causal_lm_loss(model, ids, torch.full_like(ids, -100)).isnan()  # nothing labelled, as F does


def test_public_causal_lm_loss_names_bad_shapes():
    model = FAMILIES["llama"].build()
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels the same shape, got \(2, 5\) and \(2, 4\); use labels=input_ids"):
        lorakit.causal_lm_loss(model, ids, ids[:, :4])
    with pytest.raises(ValueError, match=r"attention_mask must be shaped like input_ids \(2, 5\), got \(2, 3\)"):
        lorakit.causal_lm_loss(model, ids, ids, ids[:, :3])
