"""Each wrapper against the LoRA formula computed by hand, merge, and per-row routing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.layers import LoraConv1D, LoraConv2d, LoraEmbedding, LoraLinear


class Net(nn.Module):
    """One layer of each supported type."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 10)
        self.c1d = Conv1D(8, 10)  # GPT-2 style: 10 -> 8, weight stored (10, 8)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.conv1x1 = nn.Conv2d(5, 4, 1)

    def forward(self, ids, image):
        h = self.c1d(self.lin(self.emb(ids)))
        return h.sum(-1), self.conv1x1(self.conv(image))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _inputs(batch=4):
    gen = torch.Generator().manual_seed(5)
    return torch.randint(0, 20, (batch, 6), generator=gen), torch.randn(batch, 3, 7, 7, generator=gen)


ALL = ["emb", "lin", "c1d", "conv", "conv1x1"]


def _inject(model, name="default", r=3, alpha=6.0, **kw):
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, target_modules=ALL, init="random", **kw), name)
    return model


def test_dispatch_picks_the_right_wrapper():
    m = _inject(_net())
    assert isinstance(m.emb, LoraEmbedding)
    assert isinstance(m.lin, LoraLinear) and not isinstance(m.lin, LoraConv1D)
    assert isinstance(m.c1d, LoraConv1D)
    assert isinstance(m.conv, LoraConv2d)
    assert type(m) is Net  # the model class does not change


def test_each_layer_matches_hand_formula():
    m = _inject(_net(), r=3, alpha=6.0)
    s = 6.0 / 3
    ids, image = _inputs()
    x = torch.randn(4, 6, 12)
    lin = m.lin
    want = (
        x @ lin.base_layer.weight.T
        + lin.base_layer.bias
        + s * (x @ lin.lora_A["default"].weight.T) @ lin.lora_B["default"].weight.T
    )
    assert_close(lin(x), want)

    c = m.c1d
    x10 = torch.randn(4, 6, 10)
    want = (
        x10 @ c.base_layer.weight
        + c.base_layer.bias
        + s * x10 @ c.lora_A["default"].weight.T @ c.lora_B["default"].weight.T
    )
    assert_close(c(x10), want)

    e = m.emb
    a, b = e.lora_embedding_A["default"], e.lora_embedding_B["default"]
    want = e.base_layer.weight[ids] + s * (a.T[ids] @ b.T)
    assert_close(e(ids), want)

    cv = m.conv
    want = cv.base_layer(image) + s * F.conv2d(
        F.conv2d(image, cv.lora_A["default"].weight, padding=1), cv.lora_B["default"].weight
    )
    assert_close(cv(image), want)


@pytest.mark.parametrize("layer", ALL)
def test_delta_weight_equals_unmerged_update(layer):
    m = _inject(_net())
    ids, image = _inputs()
    before = m(ids, image)
    lorakit.merge(m)
    merged = m(ids, image)
    for got, want in zip(merged, before, strict=True):
        assert_close(got, want, rtol=1e-5, atol=1e-5)
    module = getattr(m, layer)
    assert module.merged_adapters == ["default"]
    lorakit.unmerge(m)
    assert module.merged_adapters == []


def test_initial_update_is_zero_for_default_init():
    torch.manual_seed(0)
    base = _net()
    ids, image = _inputs()
    want = base(ids, image)
    lorakit.inject(base, lorakit.LoraConfig(r=2, target_modules=ALL))
    for got, exp in zip(base(ids, image), want, strict=True):
        assert torch.equal(got, exp)


def test_gaussian_init_starts_at_base_and_has_random_a():
    m = _net()
    lorakit.inject(m, lorakit.LoraConfig(r=4, target_modules=["lin"], init="gaussian"))
    a = m.lin.lora_A["default"].weight
    assert a.abs().sum() > 0 and torch.count_nonzero(m.lin.lora_B["default"].weight) == 0
    assert a.std().item() == pytest.approx(1 / 4, rel=0.5)


def test_route_rows_equal_single_adapter_runs_for_every_layer_type():
    m = _inject(_net(), "a", r=3)
    _inject(m, "b", r=5, alpha=2.0)
    ids, image = _inputs(batch=5)
    rows = ["a", None, "b", "a", "b"]
    with lorakit.route(m, rows):
        mixed = m(ids, image)
    singles = {}
    for name in ("a", "b"):
        lorakit.set_active(m, name)
        singles[name] = m(ids, image)
    with lorakit.disabled(m):
        singles[None] = m(ids, image)
    for i, name in enumerate(rows):
        for got, want in zip(mixed, singles[name], strict=True):
            assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)


def test_route_gradients_reach_each_rows_adapter_only():
    m = _inject(_net(), "a")
    _inject(m, "b")
    lorakit.set_active(m, ["a", "b"])
    ids, image = _inputs(batch=2)
    with lorakit.route(m, ["a", None]):
        out = m(ids, image)
    (out[0].sum() + out[1].sum()).backward()
    assert m.lin.lora_A["a"].weight.grad.abs().sum() > 0
    assert m.lin.lora_A["b"].weight.grad is None or m.lin.lora_A["b"].weight.grad.abs().sum() == 0


def test_route_checks_batch_size_and_names():
    m = _inject(_net())
    ids, image = _inputs(batch=3)
    with (
        pytest.raises(ValueError, match="2 row names but the batch has 3 rows"),
        lorakit.route(m, ["default", None]),
    ):
        m(ids, image)
    with pytest.raises(ValueError, match="no adapter named 'nope'"), lorakit.route(m, ["nope"]):
        pass


def test_bias_modes():
    m = _inject(_net(), bias="lora_only")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "lin.base_layer.bias" in trainable and "conv.base_layer.bias" in trainable
    assert not any(n.endswith("weight") and "lora" not in n for n in trainable)

    class WithFreeBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

    w = WithFreeBias()
    lorakit.inject(w, lorakit.LoraConfig(r=2, target_modules=["a"], bias="all"))
    assert w.b.bias.requires_grad and not w.b.weight.requires_grad
    w2 = WithFreeBias()
    lorakit.inject(w2, lorakit.LoraConfig(r=2, target_modules=["a"], bias="none"))
    assert not any(p.requires_grad for n, p in w2.named_parameters() if "bias" in n)


def test_dropout_applies_in_training_only():
    m = _net()
    lorakit.inject(m, lorakit.LoraConfig(r=4, target_modules=["lin"], dropout=0.5, init="random"))
    x = torch.randn(2, 5, 12)
    m.eval()
    assert torch.equal(m.lin(x), m.lin(x))
    m.train()
    torch.manual_seed(0)
    assert not torch.equal(m.lin(x), m.lin(x))


def test_conv2d_with_groups_is_refused_clearly():
    m = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1 and dilation=1"):
        lorakit.inject(m, lorakit.LoraConfig(r=2, target_modules=["0"]))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("bias", ["none", "all"])
def test_fused_lora_function_matches_the_general_path(name, bias, cpu_gemm, monkeypatch):
    from .conftest import FAMILIES, randomize_adapters

    family = FAMILIES[name]
    model = family.build()  # eval mode: GPT-2's own dropout would make the two runs differ
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=5, target_modules=family.targets, init="random", bias=bias))
    randomize_adapters(model)
    inputs = family.inputs(batch=4, length=12)  # 48 rows: past fastpath.MAX_ROWS, so oneDNN takes them
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads():
        model.zero_grad()
        out = model(**inputs).logits
        (out.square().mean()).backward()
        return out.detach(), [p.grad.clone() for p in params]

    fused_out, fused_grads = loss_and_grads()
    calls = []
    original = LoraLinear.fast_path_adapter
    monkeypatch.setattr(LoraLinear, "fast_path_adapter", lambda self, *a: calls.append(1) or None)
    plain_out, plain_grads = loss_and_grads()
    assert calls  # the general path really ran the second time
    monkeypatch.setattr(LoraLinear, "fast_path_adapter", original)
    assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("adapter_dtype", "autocast", "fast"),
    [("base", False, True), (None, False, False), (None, True, True), ("base", True, True)],
)
def test_the_fast_path_runs_in_one_dtype_or_under_cpu_autocast(adapter_dtype, autocast, fast, monkeypatch):
    """A bf16 base: with bf16 adapters the fast path runs; with float32 ones, outside autocast, the reference maths
    (the update in float32, cast back); under CPU autocast (which ``torch.is_autocast_enabled()`` without a device
    does not see), the fast path in bf16."""
    from lorakit.layers.kernels import LoraLinearFunction

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10)).to(torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["0"], init="random"), adapter_dtype=adapter_dtype)
    calls = []
    original = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    assert out.dtype == torch.bfloat16 and len(calls) == int(fast)


def _grads_by_path(model, inputs, loss=lambda out: out.square().mean()):
    model.zero_grad()
    out = model(**inputs).logits
    loss(out).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", ["none", "all"])
def test_shared_input_groups_match_the_general_path_with_different_ranks(bias, cpu_gemm, monkeypatch):
    """q/k/v and gate/up run as stacked-A groups; outputs and gradients equal the layer-by-layer reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.layers import SharedInput
    from lorakit.layers.kernels import SharedInputLoraFunction

    from .conftest import FAMILIES, randomize_adapters

    family = FAMILIES["llama"]
    torch.manual_seed(0)
    llama = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)
    model = LlamaForCausalLM(LlamaConfig(**llama, num_key_value_heads=2, attention_bias=True, mlp_bias=True))
    config = lorakit.LoraConfig(
        r=3,
        alpha=5,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"k_proj": 2, "v_proj": 5, "up_proj": 1},
        alpha_pattern={"v_proj": 9.0},
        init="random",
        bias=bias,
    )
    lorakit.inject(model, config)
    randomize_adapters(model)
    groups = {id(m.shared_input) for m in model.modules() if getattr(m, "shared_input", None) is not None}
    assert len(groups) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up in every layer
    model.train()  # no dropout configured: train mode only makes the fused path form weight gradients
    inputs = family.inputs(batch=4, length=12)
    applied = []
    original_apply = SharedInputLoraFunction.apply
    monkeypatch.setattr(SharedInputLoraFunction, "apply", lambda *a: applied.append(1) or original_apply(*a))
    grouped_out, grouped = _grads_by_path(model, inputs)
    assert len(applied) == len(groups)
    assert all(
        m.enabled for m in {m.shared_input for m in model.modules() if getattr(m, "shared_input", None) is not None}
    )
    monkeypatch.setattr(SharedInput, "output", lambda self, member, x: None)
    monkeypatch.setattr(LoraLinear, "fast_path_adapter", lambda self, *a: None)  # the reference path throughout
    plain_out, plain = _grads_by_path(model, inputs)
    assert_close(grouped_out, plain_out, rtol=1e-5, atol=1e-6)
    assert grouped.keys() == plain.keys()
    assert any("lora_A" in n for n in grouped) and (bias == "none" or any(n.endswith(".bias") for n in grouped))
    for name in plain:
        assert_close(grouped[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shared_input_group_switches_off_when_members_read_different_inputs():
    """Cross-attention: q reads the decoder, k and v the encoder; results stay right and the group steps aside."""
    from lorakit.layers import SharedInput

    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x, memory):
            return self.q_proj(x) * self.k_proj(memory) + self.v_proj(memory)

    torch.manual_seed(0)
    model = nn.Sequential()
    model.attn = CrossAttention()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"], init="random"))
    group = model.attn.q_proj.shared_input
    assert isinstance(group, SharedInput) and group.enabled
    x, memory = torch.randn(3, 6), torch.randn(3, 6)

    def expected():
        layers = model.attn.q_proj, model.attn.k_proj, model.attn.v_proj
        q, k, v = (m.base_layer(t) + m._update(t, "default") for m, t in zip(layers, (x, memory, memory), strict=True))
        return q * k + v

    first = model.attn(x, memory)
    assert not group.enabled and not group._pending
    assert_close(first, expected())
    assert_close(model.attn(x, memory), expected())


def test_shared_input_group_handles_unused_outputs_and_no_input_gradient():
    """A member whose output goes unused gets no gradient; an input that needs none gets none."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(5, 7), nn.Linear(5, 7)

        def forward(self, x):
            gate, _unused = self.gate_proj(x), self.up_proj(x)
            return gate

    torch.manual_seed(0)
    model = nn.Sequential()
    model.block = Block()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["gate_proj", "up_proj"], init="random"))
    model.train()
    x = torch.randn(2, 4, 5)
    model.block(x).sum().backward()
    gate, up = model.block.gate_proj, model.block.up_proj
    assert gate.lora_A["default"].weight.grad is not None and gate.lora_B["default"].weight.grad is not None
    assert up.lora_A["default"].weight.grad is None and up.lora_B["default"].weight.grad is None
    a = gate.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = gate.lora_B["default"].weight.detach().clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    (gate.base_layer(x_ref) + gate.scaling["default"] * (x_ref @ a.T) @ b.T).sum().backward()
    assert_close(gate.lora_A["default"].weight.grad, a.grad, rtol=1e-5, atol=1e-6)
    assert_close(gate.lora_B["default"].weight.grad, b.grad, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    x_grad = x.clone().requires_grad_(True)
    model.block(x_grad).sum().backward()
    assert_close(x_grad.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_deleting_an_adapter_relinks_the_groups():
    from .conftest import FAMILIES

    model = FAMILIES["llama"].build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "one")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["k_proj"]), "two")
    attn = model.model.layers[0].self_attn
    assert len(attn.q_proj.shared_input.members) == 3
    lorakit.delete_adapter(model, "two")
    assert type(attn.k_proj) is nn.Linear
    assert attn.q_proj.shared_input.members == [attn.q_proj, attn.v_proj]


def test_shared_input_groups_work_under_inference_mode():
    from .conftest import FAMILIES, randomize_adapters

    family = FAMILIES["llama"]
    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"], init="random"))
    randomize_adapters(model)
    inputs = family.inputs()
    expected = family.logits(model, inputs)
    with torch.inference_mode():
        assert_close(model(**inputs).logits, expected)
        assert_close(model(**inputs).logits, expected)
