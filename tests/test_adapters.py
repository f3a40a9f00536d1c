"""Several adapters on one model: activate, disable, route, delete, merge, unload."""

import pytest
import torch
from torch.testing import assert_close

import lorakit
from lorakit.layers import LoraLayer, ModulesToSave

from .conftest import FAMILIES, logits_alone, randomize_adapters, tiny_opt


def _two_adapters(family):
    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets, init="random"), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=3.0, target_modules=family.targets[:1], init="random"), "b")
    randomize_adapters(model)
    return model


def test_set_active_several_adapters_add(family):
    model = _two_adapters(family)
    with lorakit.disabled(model):
        base = family.logits(model)
    assert lorakit.active_adapters(model) == ["b"]
    lorakit.set_active(model, "a")
    only_a = family.logits(model)
    lorakit.set_active(model, "b")
    only_b = family.logits(model)
    lorakit.set_active(model, ["a", "b"])
    both = family.logits(model)
    if family.name in ("llama", "gpt2"):  # adapters on different layers of a nonlinear net do not add exactly
        assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    # the combined update at one layer is the sum of the two updates
    path = next(p for p, m in model.named_modules() if isinstance(m, LoraLayer) and len(m.adapter_names) == 2)
    layer = model.get_submodule(path)
    x = torch.randn(2, 3, layer.in_out[0])
    with torch.no_grad():
        base_out = layer.base_layer(x)
        lorakit.set_active(model, "a")
        da = layer(x) - base_out
        lorakit.set_active(model, "b")
        db = layer(x) - base_out
        lorakit.set_active(model, ["a", "b"])
        assert_close(layer(x) - base_out, da + db, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base, only_a)


def test_only_active_adapters_train():
    model = _two_adapters(FAMILIES["llama"])
    lorakit.set_active(model, "a")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".a." in n for n in names)
    lorakit.set_active(model, ["a", "b"])
    assert any(".b." in n for n, p in model.named_parameters() if p.requires_grad)


def test_disabled_gives_base_and_restores(family):
    model = family.build()
    base = family.logits(model)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets, init="random"))
    adapted = family.logits(model)
    with lorakit.disabled(model):
        assert torch.equal(family.logits(model), base)
    # not bit-equal for T5: the first forward finds that cross-attention's q and v read different inputs
    # (their SharedInput group switches off), so q's update is summed in a different order afterwards
    assert_close(family.logits(model), adapted, rtol=1e-6, atol=1e-6)
    lorakit.merge(model)
    with lorakit.disabled(model):
        assert_close(family.logits(model), base, rtol=1e-5, atol=1e-5)
    assert_close(family.logits(model), adapted, rtol=1e-5, atol=1e-5)
    assert any(m.merged_adapters for m in model.modules() if isinstance(m, LoraLayer))


def _assert_route_matches_rows_alone(model, family, inputs, rows):
    with lorakit.route(model, rows):
        mixed = family.logits(model, inputs)
    for i, name in enumerate(rows):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        if name is None:
            with lorakit.disabled(model):
                alone = family.logits(model, one)
        else:
            lorakit.set_active(model, name)
            alone = family.logits(model, one)
        assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_route_mixed_rows_equal_each_row_alone(family):
    model = _two_adapters(family)
    _assert_route_matches_rows_alone(model, family, family.inputs(batch=4), ["b", None, "a", "b"])


def test_route_with_kept_stacks_equals_fresh_stacks_until_cleared():
    llama = FAMILIES["llama"]
    model = _two_adapters(llama)
    inputs = llama.inputs(batch=3)
    stacks: dict = {}
    with lorakit.route(model, ["a", None, "a"]):
        fresh = llama.logits(model, inputs)
    for _ in range(2):  # the first call fills the stacks, the second reuses them
        with lorakit.route(model, ["a", None, "a"], stacks=stacks):
            assert_close(llama.logits(model, inputs), fresh, rtol=1e-6, atol=1e-6)
    layers = {k: v for k, v in stacks.items() if isinstance(k, int)}  # and the adapter layers' list, found once
    assert layers and all(entry[0] == ("a",) for entry in layers.values())  # kept per layer for these names
    assert stacks["adapter layers"] == [m for _, m in lorakit.adapters.adapter_modules(model)]
    with lorakit.route(model, ["b", "b", None], stacks=stacks):  # other rows, same stacks
        other = llama.logits(model, inputs)
    with lorakit.route(model, ["b", "b", None]):
        assert_close(llama.logits(model, inputs), other, rtol=1e-6, atol=1e-6)


def test_route_with_modules_to_save_copies():
    bert = FAMILIES["bert"]
    model = bert.build()
    for name in ("a", "b"):
        cfg = lorakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"], init="random")
        lorakit.inject(model, cfg, name)
        with torch.no_grad():
            model.classifier.modules_to_save[name].weight.normal_()
    _assert_route_matches_rows_alone(model, bert, bert.inputs(batch=3), ["a", "b", None])


@pytest.mark.parametrize(("adapter_dtype", "expected"), [(None, torch.float32), ("base", torch.bfloat16)])
def test_a_combined_adapter_takes_the_adapter_dtype(adapter_dtype, expected):
    """combine creates adapters too: float32 over a bf16 base by default, like inject and load_adapter."""
    model = FAMILIES["llama"].build(dtype=torch.bfloat16)
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init="random"), name)
    lorakit.combine(model, {"a": 1.0, "b": -0.5}, "c", method="cat", adapter_dtype=adapter_dtype)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["c"].weight.dtype == layer.lora_B["c"].weight.dtype == expected
    want = layer.delta_weight("a") - 0.5 * layer.delta_weight("b")
    assert_close(layer.delta_weight("c"), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())  # bf16 factors


def test_route_refuses_merged_adapters():
    model = _two_adapters(FAMILIES["llama"])
    lorakit.merge(model)
    with pytest.raises(ValueError, match="unmerge"), lorakit.route(model, ["a"]):
        pass


def test_delete_adapter_unwraps_unused_layers(family):
    model = family.build()
    base = family.logits(model)
    original_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets, init="random"), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets[:1], init="random"), "b")
    lorakit.merge(model, ["a"])
    lorakit.delete_adapter(model, "a")
    assert all(m.adapter_names == ["b"] for m in model.modules() if isinstance(m, LoraLayer))
    lorakit.delete_adapter(model, "b")
    assert not any(isinstance(m, LoraLayer | ModulesToSave) for m in model.modules())
    assert_close(family.logits(model), base, rtol=1e-5, atol=1e-5)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == original_flags


def test_unknown_adapter_names_are_clear_errors():
    model = _two_adapters(FAMILIES["llama"])
    for call in (
        lambda: lorakit.set_active(model, "c"),
        lambda: lorakit.delete_adapter(model, "c"),
        lambda: lorakit.merge(model, ["c"]),
        lambda: lorakit.save_adapter(model, "/nonexistent/x", name="c"),
    ):
        with pytest.raises(ValueError, match=r"no adapter named 'c' on this model; adapters present: \['a', 'b'\]"):
            call()
    plain = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match="has no lorakit adapters"):
        lorakit.merge(plain)


@pytest.mark.parametrize("merge", [True, False])
def test_unload(family, merge):
    model = family.build()
    base = family.logits(model)
    cfg = lorakit.LoraConfig(r=2, target_modules=family.targets, init="random", modules_to_save=family.modules_to_save)
    lorakit.inject(model, cfg)
    randomize_adapters(model)
    adapted = family.logits(model)
    plain = lorakit.unload(model, merge=merge)
    assert plain is model
    assert not any(isinstance(m, LoraLayer | ModulesToSave) for m in plain.modules())
    assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    assert_close(family.logits(plain), adapted if merge else base, rtol=1e-5, atol=1e-5)
    assert set(plain.state_dict()) == set(family.build().state_dict())


def test_unload_of_a_bf16_model_gives_back_one_dtype():
    """Float32 adapters and a float32 modules_to_save copy over a bf16 model: merged and unloaded, everything is
    bf16 again (the copy rounded like the merged updates), and the plain model runs without autocast."""
    family = FAMILIES["bert"]  # modules_to_save=["classifier"]
    model = family.build(dtype=torch.bfloat16)
    cfg = lorakit.LoraConfig(r=2, target_modules=family.targets, init="random", modules_to_save=family.modules_to_save)
    lorakit.inject(model, cfg)
    randomize_adapters(model, scale=0.05)
    assert model.classifier.modules_to_save["default"].weight.dtype == torch.float32
    adapted = family.logits(model)
    plain = lorakit.unload(model)
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    got = family.logits(plain)
    assert_close(got.float(), adapted.float(), rtol=2e-2, atol=2e-2 * adapted.abs().max().item())


def test_tied_weights_refuse_merge():
    model = FAMILIES["gpt2"].build()  # wte is tied to lm_head
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["wte"], init="random"))
    with pytest.raises(ValueError, match="shared \\(tied\\)"):
        lorakit.merge(model)


def test_trainable_summary_counts():
    model = FAMILIES["llama"].build()
    total = sum(p.numel() for p in model.parameters())
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    s = lorakit.trainable_summary(model)
    assert s.trainable == 2 * (2 * 16 + 16 * 2)  # two layers, A: 2x16, B: 16x2
    assert s.total == total + s.trainable
    assert f"{s.trainable:,}" in str(s) and "trainable%" in str(s)


def _opt():
    return tiny_opt().eval(), ["q_proj", "v_proj", "fc1", "fc2"]


def _gpt2():
    return FAMILIES["gpt2"].build(), ["c_attn", "c_fc", "c_proj"]


FLATTENING = {"opt": _opt, "gpt2": _gpt2}


def _three_adapters(kind):
    torch.manual_seed(0)
    model, targets = FLATTENING[kind]()
    for k, name in enumerate(("a", "b", "c")):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + k, alpha=4.0, target_modules=targets, init="random"), name)
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("kind", sorted(FLATTENING))
@pytest.mark.parametrize("kept_stacks", [False, True])
def test_route_on_models_whose_layers_see_rows_flattened(kind, kept_stacks):
    """OPT's decoder runs fc1/fc2 on (rows * tokens, hidden): each row must still get its own adapter."""
    model = _three_adapters(kind)
    ids = torch.randint(1, 64, (5, 9), generator=torch.Generator().manual_seed(3))
    rows = ["c", "a", None, "b", "a"]
    seen = []
    fc = next(m for p, m in model.named_modules() if p.endswith(("fc1", "c_fc")) and isinstance(m, LoraLayer))
    hook = fc.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad(), lorakit.route(model, rows, stacks={} if kept_stacks else None):
        mixed = model(ids).logits
    hook.remove()
    assert seen[0][0] == (5 * 9 if kind == "opt" else 5)  # OPT's MLP really sees the rows flattened
    for i, name in enumerate(rows):
        with torch.no_grad():
            alone = logits_alone(model, ids, i, name)
        assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_routed_training_on_flattened_rows_sends_each_rows_gradient_to_its_adapter():
    model = _three_adapters("opt")
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    model.train()
    lorakit.set_active(model, ["a", "b", "c"])  # all three train; the routed rows use b only
    with lorakit.route(model, ["b", "b"]):
        routed = model(input_ids=ids, labels=ids).loss
    routed.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".b." in n and p.grad is not None}
    assert grads and all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if ".a." in n)
    model.zero_grad(set_to_none=True)
    lorakit.set_active(model, "b")
    model(input_ids=ids, labels=ids).loss.backward()
    for name, grad in grads.items():
        assert_close(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6)


def test_route_counts_rows_at_the_models_input():
    model = _three_adapters("opt")
    ids = torch.randint(1, 64, (4, 6))
    # 2 names for 4 rows would divide the flattened 24 entries: the model's input is checked first
    with pytest.raises(ValueError, match="2 row names but the batch has 4 rows"), lorakit.route(model, ["a", "b"]):
        model(ids)
