"""The fused gated-MLP and RMS-norm forwards (``lorakit.fuse_forwards``) give the model's own outputs and
gradients, keep fewer tensors for backward, step aside for inference and hooks, show in ``print(model)``,
and go away with the adapters."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.layers import fused, unfuse_forwards

from .conftest import FAMILIES, randomize_adapters

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(mlp_bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=mlp_bias,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so a wrong weight term in the gradient would show
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.weight.uniform_(0.5, 1.5)
    return model


def _inject_fused(model, config):
    lorakit.inject(model, config)
    return lorakit.fuse_forwards(model)


def _outputs_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs).logits
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_against_unfused(model, inputs):
    fused_out, fused = _outputs_and_grads(model, inputs)
    unfuse_forwards(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    plain_out, plain = _outputs_and_grads(model, inputs)
    assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-6)
    assert fused.keys() == plain.keys()
    for name in plain:
        assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    return fused


@pytest.mark.parametrize("targets", [ALL, ["gate_proj", "down_proj"], ["q_proj", "up_proj"]])
@pytest.mark.parametrize("mlp_bias", [False, True])
def test_fused_forwards_match_the_model_with_lora(targets, mlp_bias, cpu_gemm):
    model = _llama(mlp_bias)
    _inject_fused(
        model,
        lorakit.LoraConfig(r=3, alpha=5, target_modules=targets, rank_pattern={"down_proj": 2}, init="random"),
    )
    randomize_adapters(model)
    model.train()
    mlps = [layer.mlp for layer in model.model.layers]
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 2 * len(mlps) + 1
    assert all(m.forward.__func__ is fused._gated_mlp_forward for m in mlps)
    assert all(m.forward.__func__ is fused._rms_norm_forward for m in norms)
    grads = _check_against_unfused(model, FAMILIES["llama"].inputs(batch=4, length=12))
    assert any("lora_A" in n for n in grads)


def test_fused_forwards_of_a_bf16_model_with_bf16_adapters_match_the_model(monkeypatch):
    """precision=bf16 (adapter_dtype="base", no autocast): the fused MLP and RMS norm run in bf16 (they stepped
    aside for anything but float32 before), with the model's outputs and gradients to bf16 rounding compounded
    over the layers (2 % of the largest entry; tests/test_mixed_precision_layers.py has the layer by layer ones)."""
    from lorakit.layers.kernels import GatedDownLora, RmsNorm

    model = _llama(mlp_bias=True).to(torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=5, target_modules=ALL, init="random"), adapter_dtype="base")
    randomize_adapters(model, scale=0.05)
    lorakit.fuse_forwards(model)
    model.train()
    calls = []
    for function in (GatedDownLora, RmsNorm):
        original = function.apply
        monkeypatch.setattr(function, "apply", lambda *a, original=original: calls.append(1) or original(*a))
    inputs = FAMILIES["llama"].inputs(batch=4, length=12)
    fused_out, fused = _outputs_and_grads(model, inputs)
    assert len(calls) == 2 + 5
    unfuse_forwards(model)
    plain_out, plain = _outputs_and_grads(model, inputs)
    assert fused_out.dtype == torch.bfloat16 and fused.keys() == plain.keys()
    for name, want in [("logits", plain_out), *plain.items()]:
        got = fused_out if name == "logits" else fused[name]
        assert got.dtype == torch.bfloat16
        assert_close(got.float(), want.float(), rtol=1.6e-2, atol=2e-2 * want.abs().max().item(), msg=name)


def test_frozen_a_matrices_skip_the_recomputation_and_keep_b_gradients_right():
    """With every A frozen the fused functions need neither x A^T's gradient nor down_proj's input."""
    model = _llama(mlp_bias=True)
    _inject_fused(model, lorakit.LoraConfig(r=3, target_modules=ALL, init="random"))
    randomize_adapters(model)
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    model.train()
    grads = _check_against_unfused(model, FAMILIES["llama"].inputs(batch=4, length=12))
    assert any("down_proj.lora_B" in n for n in grads) and not any("lora_A" in n for n in grads)


def test_rms_norm_weights_that_train_get_the_same_gradient():
    model = _llama()
    _inject_fused(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init="random"))
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.weight.requires_grad_(True)
    grads = _check_against_unfused(model, FAMILIES["llama"].inputs())
    assert sum(n.endswith("norm.weight") for n in grads) == 5


def test_inference_and_other_dtypes_run_the_models_own_forward():
    model = _llama()
    reference = _llama()
    _inject_fused(model, lorakit.LoraConfig(r=2, target_modules=ALL))  # B = 0: same function as the base
    inputs = FAMILIES["llama"].inputs()
    with torch.no_grad():
        norm = model.model.norm
        x = torch.randn(3, 16)
        assert torch.equal(norm(x), type(norm).forward(norm, x))  # bit for bit, not just close
        assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-6)
    norm = model.model.norm.double()
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.equal(norm(x), type(norm).forward(norm, x))


def test_fused_mlp_keeps_two_intermediate_activations_fewer():
    model = _llama()
    _inject_fused(model, lorakit.LoraConfig(r=2, target_modules=ALL, init="random"))
    model.train()
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 12, 16, requires_grad=True)

    def saved_bytes() -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(x).sum().backward()
        return sum(storages.values())

    fused = saved_bytes()
    unfuse_forwards(model)
    plain = saved_bytes()
    intermediate = 4 * 12 * 40 * 4  # one (4, 12, 40) float32 activation
    assert plain - fused >= 2 * intermediate


def test_hooks_on_down_proj_still_run():
    model = _llama()
    _inject_fused(model, lorakit.LoraConfig(r=2, target_modules=ALL, init="random"))
    model.train()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    model(**FAMILIES["llama"].inputs()).logits.sum().backward()
    assert seen == [torch.Size([3, 7, 16])]


def test_fusing_is_an_option_shown_in_the_models_repr_and_unload_takes_it_away():
    model = _llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=ALL))
    assert not any("forward" in m.__dict__ for m in model.modules())  # inject alone changes no forward
    assert "lorakit:" not in str(model)
    paths = lorakit.fuse_forwards(model)
    assert paths == ["model.layers.0.mlp", "model.layers.1.mlp"] + [
        p for p, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"
    ]
    assert lorakit.fuse_forwards(model) == paths  # idempotent
    labels = {p: model.get_submodule(p).extra_repr() for p in paths}
    assert all(labels[p] == "lorakit: fused gated MLP" for p in paths if p.endswith("mlp"))
    assert all(labels[p].endswith(", lorakit: fused RMS norm") for p in paths if p.endswith("norm"))
    assert "lorakit: fused gated MLP" in str(model) and "eps=1e-06, lorakit: fused RMS norm" in str(model)
    lorakit.unload(model)
    assert not any("forward" in m.__dict__ or "extra_repr" in m.__dict__ for m in model.modules())
    assert "lorakit" not in str(model)


def test_deleting_the_last_adapter_takes_the_fusions_away():
    model = _llama()
    _inject_fused(model, lorakit.LoraConfig(r=2, target_modules=ALL))
    lorakit.delete_adapter(model, "default")
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_other_model_families_are_left_alone():
    for name in ("gpt2", "bert", "t5"):
        family = FAMILIES[name]
        model = family.build()
        assert _inject_fused(model, lorakit.LoraConfig(r=2, target_modules=family.targets)) == []
        assert not any("forward" in m.__dict__ for m in model.modules() if not isinstance(m, nn.Linear)), name
