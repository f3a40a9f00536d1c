"""Every layer fast path under ``torch.autocast`` (bf16-mixed: a bf16 base, float32 adapters): the same outputs
and gradients as the reference maths under autocast, float32 gradients for float32 adapters, and a spy that
fails when a fast path steps aside; DoRA, routing, embeddings, convolutions and modules_to_save copies under
autocast and without it; a few training steps against float32 training.

Tolerances: both paths round to bfloat16 (8 significant bits, a relative step of 2^-8 = 0.4 %) at different
points (the fast path adds the update inside one ``addmm``; the reference rounds the base output, the update and
their sum separately), so values may differ by a few bf16 steps: ``rtol=1.6e-2`` (torch's own bf16 default,
four steps) with an absolute slack of 1-2 % of the tensor's largest entry for entries near zero, where a sum's
rounding error is large relative to the entry. Against float32 maths, where every product differs, 2 % and
``rtol=4e-2``. Whole models get random adapters of ``MODEL_SCALE``: with larger ones the updates dominate and
amplify bf16 rounding through the layers (measured at 0.2: 8 % of the largest logit between bf16-mixed and
float32, on either path), which would hide wrong maths behind a loose tolerance.
"""

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.layers import LoraLinear, SharedInput, fuse_forwards, unfuse_forwards
from lorakit.layers.kernels import GatedDownLora, LoraLinearFunction, RmsNorm, SharedInputLoraFunction

from .conftest import logits_alone, randomize_adapters

BF16 = torch.bfloat16
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_SCALE = 0.05  # random adapters on a whole model: still a visible change, without bf16 noise blowing up


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def assert_bf16_close(actual, expected, slack=1e-2, rtol=1.6e-2, msg=None):
    """Equal to a few bf16 rounding steps (see the module docstring)."""
    expected = expected.float()
    atol = slack * expected.abs().max().item() + 1e-6
    assert_close(actual.float(), expected, rtol=rtol, atol=atol, msg=msg)


def _tiny_llama(dtype=BF16, **extra) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, **extra,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so a wrong weight term would show
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.weight.uniform_(0.5, 1.5)
    return model.to(dtype)


def _ids(batch=4, length=12, seed=1):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _reference_path(monkeypatch):
    """Every LoRA linear layer and shared-input group on the reference maths from now on (this test)."""
    monkeypatch.setattr(SharedInput, "output", lambda self, member, x: None)
    monkeypatch.setattr(LoraLinear, "fast_path_adapter", lambda self, *a: None)


def _spy(monkeypatch, function) -> list:
    calls: list = []
    original = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


def _trained(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _run(model, inputs: dict, under_autocast=True):
    """Output and the gradients of the trained parameters (and of a floating input) of one forward/backward."""
    model.zero_grad(set_to_none=True)
    with autocast() if under_autocast else torch.autocast("cpu", enabled=False):
        out = model(**inputs)
    out = out.logits if hasattr(out, "logits") else out
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in _trained(model).items() if p.grad is not None}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.grad is not None:
            grads[f"input {key}"] = value.grad.clone()
            value.grad = None
    return out.detach(), grads


def _fast_and_reference(monkeypatch, model, inputs: dict, function, calls: int):
    """One forward/backward on the fast path (``function`` applied ``calls`` times), then one on the reference
    maths (``function`` not applied again)."""
    spied = _spy(monkeypatch, function)
    fast = _run(model, inputs)
    assert len(spied) == calls
    _reference_path(monkeypatch)
    reference = _run(model, inputs)
    assert len(spied) == calls
    return fast, reference


def _check_same(fast, reference, slack=1e-2):
    (fast_out, fast_grads), (ref_out, ref_grads) = fast, reference
    assert fast_out.dtype == ref_out.dtype
    assert_bf16_close(fast_out, ref_out, slack)
    assert fast_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert fast_grads[name].dtype == grad.dtype, name
        assert_bf16_close(fast_grads[name], grad, slack, msg=name)


# ----- LoraLinearFunction -------------------------------------------------------------------------------------
class _Projection(nn.Module):
    def __init__(self, kind: str, bias: bool):
        super().__init__()
        self.proj = nn.Linear(16, 24, bias=bias) if kind == "linear" else Conv1D(24, 16)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", ["none", "bf16", "float32"])
@pytest.mark.parametrize("x_dtype", [BF16, torch.float32])
def test_linear_fast_path_under_autocast_matches_the_reference(kind, bias, x_dtype, cpu_gemm, monkeypatch):
    """A bf16 Linear / GPT-2 Conv1D with float32 A and B (and a trained bias in bf16 or, as bf16-mixed keeps
    it, in float32): LoraLinearFunction's outputs and gradients are the reference's under autocast."""
    torch.manual_seed(0)
    model = _Projection(kind, bias != "none").to(BF16)
    lorakit.inject(
        model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["proj"], bias="none" if bias == "none" else "all")
    )
    randomize_adapters(model)
    layer = model.proj
    if bias == "float32":
        layer.base_layer.bias.data = layer.base_layer.bias.data.float()
    model.train()
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(2)).to(x_dtype).requires_grad_()
    fast, reference = _fast_and_reference(monkeypatch, model, {"x": x}, LoraLinearFunction, calls=1)
    _check_same(fast, reference)
    out, grads = fast
    assert out.dtype == BF16 and grads["input x"].dtype == x_dtype
    assert grads["proj.lora_A.default.weight"].dtype == grads["proj.lora_B.default.weight"].dtype == torch.float32
    if bias != "none":
        assert grads["proj.base_layer.bias"].dtype == (torch.float32 if bias == "float32" else BF16)


def test_mixed_dtypes_without_autocast_run_the_reference_maths_in_the_adapter_dtype():
    """A user's own loop without autocast: the update is computed in float32 and added in bf16."""
    torch.manual_seed(0)
    model = _Projection("linear", True).to(BF16)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["proj"], init="random"))
    randomize_adapters(model)
    layer = model.proj
    x = torch.randn(3, 5, 16).to(BF16)
    assert layer.fast_path_adapter(x, (), {}) is None
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = layer.base_layer(x) + (2.0 * (x.float() @ a.T) @ b.T).to(BF16)
    out = model(x)
    assert out.dtype == BF16
    assert_close(out, want, rtol=0, atol=0)
    out.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32


def test_float64_under_autocast_keeps_the_reference_maths():
    """Autocast leaves float64 alone, so the fast path, which would cast to bf16, steps aside."""
    model = _Projection("linear", True).double()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["proj"]))
    x = torch.randn(2, 16, dtype=torch.float64)
    with autocast():
        assert model.proj.fast_path_adapter(x, (), {}) is None
        assert model(x).dtype == torch.float64


# ----- SharedInputLoraFunction ---------------------------------------------------------------------------------
class _Block(nn.Module):
    """q/k/v and gate/up read the same x (two shared-input groups)."""

    def __init__(self, bias: bool):
        super().__init__()
        for name, d_out in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8), ("gate_proj", 24), ("up_proj", 24)):
            setattr(self, name, nn.Linear(16, d_out, bias=bias))

    def forward(self, x):
        attn = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
        return torch.cat([attn, self.gate_proj(attn[..., :16]) * self.up_proj(attn[..., :16])], -1)


@pytest.mark.parametrize("bias", ["none", "bf16", "float32"])
def test_shared_input_groups_under_autocast_match_the_reference(bias, cpu_gemm, monkeypatch):
    """q/k/v and gate/up over bf16 weights with float32 adapters of different ranks, as one stacked product each:
    the reference's outputs and gradients under autocast."""
    torch.manual_seed(0)
    model = _Block(bias != "none").to(BF16)
    config = lorakit.LoraConfig(
        r=3, alpha=5, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
        rank_pattern={"k_proj": 2, "v_proj": 5, "up_proj": 1}, init="random", bias="none" if bias == "none" else "all",
    )  # fmt: skip
    lorakit.inject(model, config)
    randomize_adapters(model)
    if bias == "float32":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.data = param.data.float()
    model.train()
    x = torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(2)).to(BF16).requires_grad_()
    fast, reference = _fast_and_reference(monkeypatch, model, {"x": x}, SharedInputLoraFunction, calls=2)
    _check_same(fast, reference)
    assert all(g.dtype == torch.float32 for n, g in fast[1].items() if "lora_" in n)
    assert bias == "none" or sum(n.endswith("bias") for n in fast[1]) == 5


# ----- the fused gated MLP and RMS norm ------------------------------------------------------------------------
class _Mlp(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP

        config = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4, mlp_bias=bias)
        self.mlp = LlamaMLP(config)

    def forward(self, x):
        return self.mlp(x)


@pytest.mark.parametrize("targets", [["gate_proj", "up_proj", "down_proj"], ["gate_proj", "down_proj"], ["up_proj"]])
@pytest.mark.parametrize("bias", ["none", "float32"])
def test_fused_gated_mlp_under_autocast_matches_the_unfused_reference(targets, bias, cpu_gemm, monkeypatch):
    """GatedDownLora (down_proj a LoRA layer) or SiluGate (not) on a bf16 LlamaMLP with float32 adapters under
    autocast: the MLP's own forward's outputs and gradients."""
    torch.manual_seed(0)
    model = _Mlp(bias != "none").to(BF16)
    lorakit.inject(
        model,
        lorakit.LoraConfig(
            r=3, alpha=5, target_modules=targets, init="random", bias="none" if bias == "none" else "all"
        ),
    )
    randomize_adapters(model)
    if bias == "float32":
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.data = param.data.float()
    assert fuse_forwards(model) == ["mlp"]
    model.train()
    x = torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(2)).to(BF16).requires_grad_()
    gated = _spy(monkeypatch, GatedDownLora)
    fast = _run(model, {"x": x})
    assert len(gated) == (1 if "down_proj" in targets else 0)
    unfuse_forwards(model)
    _reference_path(monkeypatch)
    reference = _run(model, {"x": x})
    _check_same(fast, reference)
    assert all(g.dtype == torch.float32 for n, g in fast[1].items() if "lora_" in n)


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_a_bf16_llama_under_autocast_runs_its_fast_paths_close_to_the_reference(mlp_bias, cpu_gemm, monkeypatch):
    """The whole model: every fast path and fused forward against the reference maths, with RMS norm weights
    trained too; 2 % of the largest entry, as rounding differences compound through the layers."""
    model = _tiny_llama(attention_bias=mlp_bias, mlp_bias=mlp_bias)
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=5, target_modules=ALL, init="random"))
    randomize_adapters(model, scale=MODEL_SCALE)
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.weight.requires_grad_(True)
    fuse_forwards(model)
    model.train()
    fast = _run(model, {"input_ids": _ids()})
    unfuse_forwards(model)
    _reference_path(monkeypatch)
    reference = _run(model, {"input_ids": _ids()})
    _check_same(fast, reference, slack=0.02)
    assert sum(n.endswith("norm.weight") for n in fast[1]) == 5


@pytest.mark.parametrize(
    ("x_dtype", "weight_dtype"),
    [(BF16, BF16), (torch.float32, torch.float32), (BF16, torch.float32), (torch.float32, BF16), (torch.float16,) * 2],
)
@pytest.mark.parametrize("under_autocast", [False, True])
def test_rms_norm_computes_as_transformers_llama_rms_norm(x_dtype, weight_dtype, under_autocast, monkeypatch):
    """Float32 statistics, the normalised x rounded to x's dtype, times the weight: LlamaRMSNorm's output bit for
    bit, and its gradients, in every dtype pairing and under autocast."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lorakit.layers.fused import _rms_norm_forward

    gen = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32, generator=gen) + 0.5)
    norm.weight.data = norm.weight.data.to(weight_dtype)
    x = (torch.randn(3, 7, 32, generator=gen) * 3).to(x_dtype)
    g = torch.randn(3, 7, 32, generator=gen)
    calls = _spy(monkeypatch, RmsNorm)
    results = []
    for forward in (_rms_norm_forward, LlamaRMSNorm.forward):
        xi = x.clone().requires_grad_()
        norm.weight.grad = None
        with autocast() if under_autocast else torch.autocast("cpu", enabled=False):
            out = forward(norm, xi)
        (out * g.to(out.dtype)).sum().backward()
        results.append((out.detach(), xi.grad, norm.weight.grad))
    assert len(calls) == 1  # the fused function ran the first time
    (out, grad_x, grad_w), (want, want_x, want_w) = results
    assert out.dtype == want.dtype and grad_x.dtype == x_dtype and grad_w.dtype == weight_dtype
    assert torch.equal(out, want)
    assert_bf16_close(grad_x, want_x, slack=1e-3)
    assert_bf16_close(grad_w, want_w, slack=1e-3)


# ----- every fast path, spied ---------------------------------------------------------------------------------
def test_every_fast_path_runs_under_autocast_on_a_bf16_llama_with_float32_adapters(monkeypatch):
    """Fails when any fast path falls back to the reference maths under autocast: counts every fused function's
    calls in one training forward of a bf16 LLaMA with float32 adapters on all its linear layers."""
    model = _tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL))
    fuse_forwards(model)
    model.train()
    counts = {
        f.__name__: _spy(monkeypatch, f) for f in (LoraLinearFunction, SharedInputLoraFunction, GatedDownLora, RmsNorm)
    }
    with autocast():
        loss = model(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    layers = 2
    assert {k: len(v) for k, v in counts.items()} == {
        "LoraLinearFunction": layers,  # o_proj
        "SharedInputLoraFunction": 2 * layers,  # q/k/v and gate/up
        "GatedDownLora": layers,  # down_proj with the gate
        "RmsNorm": 2 * layers + 1,
    }
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == p.grad.dtype == torch.float32 for p in lora)
    assert all(p.dtype == BF16 for n, p in model.named_parameters() if "lora_" not in n)


# ----- DoRA -----------------------------------------------------------------------------------------------------
def _dora_pair(bias: bool, dropout: float):
    """The same DoRA adapter over a bf16 base (float32 A, B, magnitude) and over that base in float32."""
    mixed = _tiny_llama(attention_bias=bias)
    exact = _tiny_llama(attention_bias=bias)
    with torch.no_grad():
        for p, q in zip(mixed.parameters(), exact.parameters(), strict=True):
            q.copy_(p.float())
    exact.float()
    config = lorakit.LoraConfig(
        r=3, alpha=5, target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True, dropout=dropout
    )
    for model in (mixed, exact):
        lorakit.inject(model, config)
        randomize_adapters(model, scale=MODEL_SCALE)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        model.train()
    return mixed, exact


@pytest.mark.parametrize(("bias", "dropout"), [(False, 0.0), (True, 0.0), (True, 0.3)])
@pytest.mark.parametrize("under_autocast", [True, False])
def test_dora_over_a_bf16_base_follows_float32_dora(bias, dropout, under_autocast):
    """DoRA has no fast path: its reference maths under autocast (products in bf16, the norm and rescaling in
    float32) and without it (the adapter's part in float32), against the same adapter over a float32 base."""
    mixed, exact = _dora_pair(bias, dropout)
    layer = mixed.model.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector["default"].dtype == torch.float32
    assert layer.variants["default"][0].norm(layer, "default").dtype == torch.float32
    results = []
    for model, use in ((mixed, under_autocast), (exact, False)):
        torch.manual_seed(7)  # the same dropout masks
        results.append(_run(model, {"input_ids": _ids()}, under_autocast=use))
    (out, grads), (want, want_grads) = results
    assert out.dtype == BF16 and layer(torch.randn(2, 16, dtype=BF16)).dtype == BF16
    assert grads.keys() == want_grads.keys() and any("magnitude" in n for n in grads)
    assert_bf16_close(out, want, slack=2e-2, rtol=4e-2)
    for name, grad in want_grads.items():
        assert grads[name].dtype == torch.float32, name
        assert_bf16_close(grads[name], grad, slack=2e-2, rtol=4e-2, msg=name)


# ----- routing ------------------------------------------------------------------------------------------------
def _routed_llama():
    model = _tiny_llama()
    targets = [*ALL, "embed_tokens"]
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=targets, init="random"), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=3.0, target_modules=targets[::2], init="random"), "b")
    randomize_adapters(model, scale=MODEL_SCALE)
    return model


@pytest.mark.parametrize("kept_stacks", [False, True])
def test_routed_rows_under_autocast_equal_each_row_alone(kept_stacks):
    """Linear (batched and concatenated stacks) and embedding routing over a bf16 base with float32 adapters
    under autocast: each row as its own adapter alone (on the fast path) gives it."""
    model = _routed_llama().eval()  # kept stacks serve inference only
    ids = _ids(batch=4, length=6)
    rows = ["b", None, "a", "b"]
    stacks = {} if kept_stacks else None
    with torch.no_grad(), autocast():
        with lorakit.route(model, rows, stacks=stacks):
            mixed = model(ids).logits
        if kept_stacks:  # one per linear layer; 4 rows x 6 tokens x rank 6: small, float32 on a CPU (faster there)
            layers = [entry for key, entry in stacks.items() if isinstance(key, int)]
            assert len(layers) == 2 * 7 and all(entry[1].dtype == torch.float32 for entry in layers)
        for i, name in enumerate(rows):
            alone = logits_alone(model, ids, i, name)
            assert_bf16_close(mixed[i : i + 1], alone, slack=2e-2, msg=f"row {i}")
    assert mixed.dtype == BF16
    if kept_stacks:  # the same stacks without autocast: the adapters' float32 again
        with torch.no_grad(), lorakit.route(model, rows, stacks=stacks):
            plain = model(ids).logits
        assert all(entry[1].dtype == torch.float32 for key, entry in stacks.items() if isinstance(key, int))
        assert plain.dtype == BF16
        assert_bf16_close(plain, mixed, slack=2e-2)


def test_routed_training_under_autocast_gives_float32_gradients_to_each_rows_adapter():
    model = _routed_llama()
    model.train()
    lorakit.set_active(model, ["a", "b"])
    ids = _ids(batch=2, length=6)
    with autocast(), lorakit.route(model, ["b", "b"]):
        routed = model(input_ids=ids, labels=ids).loss
    routed.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".b." in n and p.grad is not None}
    assert grads and all(g.dtype == torch.float32 for g in grads.values())
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if ".a." in n)
    model.zero_grad(set_to_none=True)
    lorakit.set_active(model, "b")
    with autocast():
        model(input_ids=ids, labels=ids).loss.backward()
    for name, grad in grads.items():
        assert_bf16_close(grad, model.get_parameter(name).grad, slack=2e-2, msg=name)


# ----- embeddings, convolutions and modules_to_save copies (reference maths) ------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(12, 6)

    def forward(self, ids, image):
        return self.head(self.emb(ids)).sum(-1), self.conv(image).mean((2, 3))


def _net_pair():
    """The same adapters (and a float32 modules_to_save copy of ``head``) over a bf16 net and that net in float32."""
    torch.manual_seed(0)
    mixed = _Net().to(BF16)
    exact = _Net()
    exact.load_state_dict({k: v.float() for k, v in mixed.state_dict().items()})
    for model in (mixed, exact):
        config = lorakit.LoraConfig(
            r=3, alpha=6, target_modules=["emb", "conv"], modules_to_save=["head"], init="random"
        )
        lorakit.inject(model, config)
        randomize_adapters(model)
        with torch.no_grad():
            model.head.modules_to_save["default"].weight.add_(0.1)
    return mixed, exact


@pytest.mark.parametrize("under_autocast", [True, False])
def test_embedding_conv_and_saved_module_over_a_bf16_base(under_autocast):
    """No fast path: the reference maths with float32 adapters and a float32 saved copy, under autocast or not;
    outputs in the base's dtype, float32 gradients, close to the float32 net."""
    mixed, exact = _net_pair()
    assert mixed.head.modules_to_save["default"].weight.dtype == torch.float32
    assert mixed.head.original_module.weight.dtype == BF16
    gen = torch.Generator().manual_seed(5)
    ids, image = torch.randint(0, 20, (4, 6), generator=gen), torch.randn(4, 3, 7, 7, generator=gen)
    results = []
    for model, use, dtype in ((mixed, under_autocast, BF16), (exact, False, torch.float32)):
        model.zero_grad(set_to_none=True)
        with autocast() if use else torch.autocast("cpu", enabled=False):
            outs = model(ids, image.to(dtype))
        sum(o.float().square().mean() for o in outs).backward()
        results.append(([o.detach() for o in outs], {n: p.grad for n, p in _trained(model).items()}))
    (outs, grads), (wants, want_grads) = results
    for out, want in zip(outs, wants, strict=True):
        assert out.dtype == BF16
        assert_bf16_close(out, want, slack=2e-2, rtol=4e-2)
    assert grads.keys() == want_grads.keys() and any("modules_to_save" in n for n in grads)
    for name, want in want_grads.items():
        assert grads[name].dtype == torch.float32, name
        assert_bf16_close(grads[name], want, slack=2e-2, rtol=4e-2, msg=name)


def test_a_float32_saved_head_gives_bf16_logits_and_routes():
    """modules_to_save=["lm_head"] on a bf16 model: the copy in float32 takes the bf16 hidden states, gives bf16
    logits without autocast, and per-row routing mixes its rows with the original's."""
    model = _tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = model.lm_head
    assert head.modules_to_save["default"].weight.dtype == torch.float32
    ids = _ids(batch=2, length=5)
    with torch.no_grad():
        head.modules_to_save["default"].weight.mul_(1.5)
        logits = model(ids).logits
        assert logits.dtype == BF16
        with autocast():
            assert_bf16_close(model(ids).logits, logits)
        with lorakit.route(model, ["default", None]):
            routed = model(ids).logits
        with lorakit.disabled(model):
            base = model(ids).logits
    assert routed.dtype == BF16
    assert torch.equal(routed[0], logits[0]) and torch.equal(routed[1], base[1])


# ----- training --------------------------------------------------------------------------------------------------
def test_bf16_mixed_training_follows_float32_training():
    """A few AdamW steps of a bf16 LLaMA with float32 adapters under autocast (fused forwards on) against the
    same model and adapters in float32: losses within bf16 tolerance; adapters stay float32, the base bf16."""
    mixed = _tiny_llama()
    exact = _tiny_llama(torch.float32)
    exact.load_state_dict({k: v.float() for k, v in mixed.state_dict().items()})
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL, modules_to_save=["lm_head"])
    for model in (mixed, exact):
        lorakit.inject(model, config)
        fuse_forwards(model)
        model.train()
    with torch.no_grad():
        for p, q in zip(exact.parameters(), mixed.parameters(), strict=True):
            if p.requires_grad:
                q.copy_(p)
    ids = _ids(batch=4, length=12)
    losses = []
    for model, context in ((mixed, autocast), (exact, lambda: torch.autocast("cpu", enabled=False))):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        steps = []
        for _ in range(5):
            with context():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps.append(loss.item())
        losses.append(steps)
    mixed_losses, exact_losses = losses
    assert exact_losses[-1] < exact_losses[0] - 0.05  # it learns
    assert_close(torch.tensor(mixed_losses), torch.tensor(exact_losses), rtol=1e-2, atol=0)
    trained = ("lora_", "modules_to_save")
    assert all(p.dtype == torch.float32 for n, p in mixed.named_parameters() if any(t in n for t in trained))
    assert all(p.dtype == BF16 for n, p in mixed.named_parameters() if not any(t in n for t in trained))


def test_kept_stacks_take_autocasts_dtype_once_the_routed_product_is_large():
    """Few rows times the total rank: float32 (faster on a CPU); beyond SMALL_ROUTED_PRODUCT: autocast's bf16."""
    from lorakit.layers.linear import SMALL_ROUTED_PRODUCT

    model = _routed_llama().eval()
    for length, expected in ((6, torch.float32), (SMALL_ROUTED_PRODUCT // (4 * 2) + 1, BF16)):  # ranks: a 2, b 4
        stacks: dict = {}
        with torch.no_grad(), autocast(), lorakit.route(model, ["b", None, "a", "b"], stacks=stacks):
            model(_ids(batch=4, length=length))
        assert {entry[1].dtype for key, entry in stacks.items() if isinstance(key, int)} == {expected}, length
