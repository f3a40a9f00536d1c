"""DoRA and PiSSA against PEFT (both directions), merge, caching, conversion and refusals; rsLoRA and gaussian."""

import math

import peft
import pytest
import torch
from torch.testing import assert_close

import lorakit
from lorakit.layers import LoraLayer, LoraLinear
from lorakit.methods.lora import LoraMethod

from .conftest import FAMILIES, randomize_adapters, train_lm_steps

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _lora_layers(model):
    return {p.removeprefix("base_model.model."): m for p, m in model.named_modules() if isinstance(m, LoraLayer)}


def _peft_layers(model):
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {p.removeprefix("base_model.model."): m for p, m in model.named_modules() if isinstance(m, PeftLoraLayer)}


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}


# ----- PiSSA ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_init_matches_peft_and_keeps_the_model_output(use_rslora):
    family = FAMILIES["llama"]
    inputs = family.inputs()
    before = family.logits(family.build(), inputs)
    ours = family.build()
    lorakit.inject(ours, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="pissa", use_rslora=use_rslora))
    theirs = peft.get_peft_model(
        family.build(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa", use_rslora=use_rslora),
    )
    peft_layers = _peft_layers(theirs)
    for path, layer in _lora_layers(ours).items():
        other = peft_layers[path]
        assert_close(layer.lora_A["default"].weight, other.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        assert_close(layer.lora_B["default"].weight, other.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        assert_close(layer.base_layer.weight, other.base_layer.weight, rtol=1e-5, atol=1e-6)
    assert_close(family.logits(ours, inputs), before, rtol=1e-4, atol=1e-5)


def _trained_pissa(seed=5):
    family = FAMILIES["llama"]
    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="pissa"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stand-in for training: move A and B away from their initial values
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def test_pissa_saves_as_plain_lora_for_the_original_base(tmp_path):
    family = FAMILIES["llama"]
    inputs = family.inputs()
    model = _trained_pissa()
    trained = family.logits(model, inputs)
    directory = lorakit.save_adapter(model, tmp_path / "converted")
    config, tensors = lorakit.io.read_adapter(directory)
    assert config.init == "default" and config.r == 8 and config.alpha == 16  # rank 2r, same scaling
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 8
    fresh = family.build()  # the original base weights
    lorakit.load_adapter(fresh, directory)
    assert_close(family.logits(fresh, inputs), trained, rtol=1e-4, atol=1e-5)
    peft_model = peft.PeftModel.from_pretrained(family.build(), str(directory)).eval()
    assert_close(family.logits(peft_model, inputs), trained, rtol=1e-4, atol=1e-5)


def test_pissa_conversion_equals_peft_conversion(tmp_path):
    family = FAMILIES["llama"]
    theirs = peft.get_peft_model(
        family.build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
    )
    theirs.save_pretrained(str(tmp_path / "initial"))
    ours = family.build()
    lorakit.inject(ours, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="pissa"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (_name, mine), (_, other) in zip(
            sorted((n, p) for n, p in ours.named_parameters() if "lora_" in n),
            sorted((n, p) for n, p in theirs.named_parameters() if "lora_" in n),
            strict=True,
        ):
            step = torch.randn(mine.shape, generator=gen) * 0.05
            mine.add_(step)
            other.add_(step)
    theirs.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    lorakit.save_adapter(ours, tmp_path / "ours")
    _, mine = lorakit.io.read_adapter(tmp_path / "ours")
    _, other = lorakit.io.read_adapter(tmp_path / "peft")
    assert mine.keys() == other.keys()
    for key in mine:
        assert_close(mine[key], other[key], rtol=1e-5, atol=1e-6, msg=key)


def test_raw_pissa_file_rederives_the_residual_in_both_libraries(tmp_path):
    family = FAMILIES["llama"]
    inputs = family.inputs()
    model = _trained_pissa()
    trained = family.logits(model, inputs)
    directory = lorakit.save_adapter(model, tmp_path / "raw", pissa_as_lora=False)
    config, _ = lorakit.io.read_adapter(directory)
    assert config.init == "pissa" and config.r == 4
    fresh = family.build()
    lorakit.load_adapter(fresh, directory)
    assert_close(family.logits(fresh, inputs), trained, rtol=1e-4, atol=1e-5)
    peft_model = peft.PeftModel.from_pretrained(family.build(), str(directory)).eval()
    assert_close(family.logits(peft_model, inputs), trained, rtol=1e-4, atol=1e-5)


def test_deleting_or_unloading_pissa_gives_the_base_weights_back():
    family = FAMILIES["llama"]
    original = _base_weights(family.build())
    model = _trained_pissa()
    lorakit.delete_adapter(model, "default")
    restored = _base_weights(model)
    for name, weight in original.items():
        assert_close(restored[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    model = _trained_pissa()
    lorakit.unload(model, merge=False)
    for name, weight in _base_weights(model).items():
        assert_close(weight, original[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_restore_of_a_converted_pissa_adapter(tmp_path):
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="pissa")
    method = LoraMethod(config)
    model = _trained_pissa()
    method.save(model, tmp_path / "ckpt")
    prepared = method.prepare(FAMILIES["llama"].build())
    method.restore(prepared, tmp_path / "ckpt")
    for path, layer in _lora_layers(model).items():
        other = _lora_layers(prepared)[path]
        assert torch.equal(layer.lora_A["default"].weight, other.lora_A["default"].weight)
        assert torch.equal(layer.lora_B["default"].weight, other.lora_B["default"].weight)


def test_pissa_refusals():
    model = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match="init='pissa' applies to linear layers only.*embed_tokens"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init="pissa"))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # nothing was wrapped
    with pytest.raises(ValueError, match="exceeds this layer's min"):
        lorakit.inject(model, lorakit.LoraConfig(r=20, target_modules=["k_proj"], init="pissa"))


# ----- DoRA -----------------------------------------------------------------------------------------------
def _biased_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True, mlp_bias=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-zero biases
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def _dora_pair(tmp_path, bias=False, dropout=0.0):
    """A lorakit DoRA model with random A, B and magnitude, and PEFT's model loaded from its file; ``bias``:
    LLaMA with biased projections."""
    family = FAMILIES["llama"]
    build = _biased_llama if bias else family.build
    model = build()
    config = lorakit.LoraConfig(r=3, alpha=5, target_modules=TARGETS, use_dora=True, init="random", dropout=dropout)
    lorakit.inject(model, config)
    randomize_adapters(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    lorakit.save_adapter(model, tmp_path / "dora")
    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path / "dora"), is_trainable=True)
    return model, theirs


def test_dora_matches_peft_outputs_and_gradients(tmp_path):
    family = FAMILIES["llama"]
    inputs = family.inputs()
    ours, theirs = _dora_pair(tmp_path)
    assert_close(family.logits(ours, inputs), family.logits(theirs.eval(), inputs), rtol=1e-5, atol=1e-5)
    ours.train()
    theirs.train()
    grads = []
    for model in (ours, theirs):
        model.zero_grad()
        model(**inputs).logits.square().mean().backward()
        named = {
            n.replace(".default", "").replace("vector.weight", "vector").removeprefix("base_model.model."): p.grad
            for n, p in model.named_parameters()
        }
        grads.append({n: g for n, g in named.items() if g is not None})
    assert grads[0].keys() == grads[1].keys() and any("magnitude" in n for n in grads[0])
    for name, grad in grads[0].items():
        assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("bias", "dropout"), [(True, 0.0), (False, 0.3), (True, 0.3)])
def test_dora_matches_peft_with_biases_and_dropout(tmp_path, bias, dropout):
    """Each branch of DoRA's forward: a biased base layer, dropout in training (the same masks drawn in the
    same order), both; outputs and gradients against PEFT."""
    inputs = FAMILIES["llama"].inputs()
    ours, theirs = _dora_pair(tmp_path, bias=bias, dropout=dropout)
    results = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(7)
        logits = model(**inputs).logits
        logits.square().mean().backward()
        grads = {
            n.replace(".default", "").replace("vector.weight", "vector").removeprefix("base_model.model."): p.grad
            for n, p in model.named_parameters()
            if p.grad is not None
        }
        results.append((logits.detach(), grads))
    (mine, my_grads), (want, their_grads) = results
    assert_close(mine, want, rtol=1e-5, atol=1e-5)
    assert my_grads.keys() == their_grads.keys() and any("magnitude" in n for n in my_grads)
    for name, grad in my_grads.items():
        assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if dropout:  # the masks matter: another seed for PEFT gives other outputs
        torch.manual_seed(8)
        assert not torch.allclose(theirs(**inputs).logits, want, atol=1e-3)


def test_dora_norms_follow_fused_adamw_steps(tmp_path):
    """Fused AdamW updates A and B without moving their version counters; the cached ||W + s B A|| must still
    follow every step (PEFT computes it afresh at every forward)."""
    family = FAMILIES["llama"]
    inputs = family.inputs()
    ours, theirs = _dora_pair(tmp_path)
    for model in (ours, theirs):
        family.logits(model, inputs)  # an eval forward first: lorakit caches the norms
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
        for _ in range(3):
            optimizer.zero_grad()
            model(**inputs).logits.square().mean().backward()
            optimizer.step()
        model.eval()
    assert_close(family.logits(ours, inputs), family.logits(theirs, inputs), rtol=1e-4, atol=1e-5)


def test_peft_dora_file_loads_in_lorakit(tmp_path):
    family = FAMILIES["llama"]
    inputs = family.inputs()
    theirs = peft.get_peft_model(
        family.build(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_dora=True)
    )
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    model = family.build()
    lorakit.load_adapter(model, tmp_path / "peft")
    assert all(layer.uses("default", "dora") for layer in _lora_layers(model).values())
    assert_close(family.logits(model, inputs), family.logits(theirs.eval(), inputs), rtol=1e-5, atol=1e-5)


def test_dora_merge_unmerge_and_the_cached_norm(tmp_path, monkeypatch):
    family = FAMILIES["llama"]
    inputs = family.inputs()
    model, _ = _dora_pair(tmp_path)
    original = _base_weights(model)
    unmerged = family.logits(model, inputs)
    calls = []
    norm = torch.linalg.norm
    monkeypatch.setattr(torch.linalg, "norm", lambda *a, **k: calls.append(1) or norm(*a, **k))
    family.logits(model, inputs)
    assert not calls  # eval forwards reuse the cached ||W + s B A||
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(2)  # any in-place change invalidates the cache
    changed = family.logits(model, inputs)
    assert len(calls) == 1 and not torch.allclose(changed, unmerged)
    with torch.no_grad():
        layer.lora_B["default"].weight.div_(2)
    assert_close(family.logits(model, inputs), unmerged, rtol=1e-6, atol=1e-6)
    lorakit.merge(model)
    assert_close(family.logits(model, inputs), unmerged, rtol=1e-4, atol=1e-5)
    lorakit.unmerge(model)
    for name, weight in _base_weights(model).items():
        assert_close(weight, original[name], rtol=1e-5, atol=1e-6, msg=name)
    assert_close(family.logits(model, inputs), unmerged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("adapter_dtype", "expected"), [(None, torch.float32), ("base", torch.bfloat16)])
def test_dora_over_a_bf16_base_starts_unchanged_and_merges(adapter_dtype, expected):
    """The magnitude and the cached norm share the adapter's dtype (the norm computed in float32 either way), so a
    fresh DoRA adapter leaves a bf16 model's output bit for bit; merged, it stays within bf16 rounding."""
    family = FAMILIES["llama"]
    model = family.build(dtype=torch.bfloat16)
    want = family.logits(model)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=TARGETS, use_dora=True), adapter_dtype=adapter_dtype)
    layer = model.model.layers[0].self_attn.q_proj
    magnitude = layer.lora_magnitude_vector["default"]
    assert magnitude.dtype == layer.variants["default"][0].norm(layer, "default").dtype == expected
    assert torch.equal(magnitude, torch.linalg.norm(layer.base_layer.weight.float(), dim=1).to(expected))
    assert torch.equal(family.logits(model), want)
    randomize_adapters(model, scale=0.05)
    unmerged = family.logits(model)
    assert unmerged.dtype == torch.bfloat16
    lorakit.merge(model)
    merged = family.logits(model)
    assert_close(merged.float(), unmerged.float(), rtol=2e-2, atol=2e-2 * unmerged.abs().max().item())


def test_dora_refusals(tmp_path):
    model = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match="use_dora applies to linear layers only"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens"], use_dora=True))
    model, _ = _dora_pair(tmp_path)
    with (
        pytest.raises(ValueError, match="route\\(\\) does not support DoRA"),
        lorakit.route(model, ["default", None, "default"]),
    ):
        model(**FAMILIES["llama"].inputs())
    from lorakit.combine import combine

    with pytest.raises(ValueError, match="DoRA"):
        combine(model, {"default": 1.0}, "c", "cat")


def test_dora_trains_end_to_end_in_the_trainer_loop():
    """A few optimizer steps: loss falls and the magnitude moves."""
    family = FAMILIES["llama"]
    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p.dim() == 1 for p in params)  # the magnitudes train
    start = {id(p): p.detach().clone() for p in params}
    losses = train_lm_steps(model, params, family.inputs()["input_ids"], steps=15, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(start[id(p)], p) for p in params if p.dim() == 1)


# ----- rsLoRA and gaussian init against PEFT ---------------------------------------------------------------
def test_rslora_scaling_and_gaussian_init_match_peft():
    family = FAMILIES["llama"]
    ours = family.build()
    lorakit.inject(ours, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_rslora=True, init="gaussian"))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        family.build(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True, init_lora_weights="gaussian"),
    )
    peft_layers = _peft_layers(theirs)
    for path, layer in _lora_layers(ours).items():
        assert layer.scaling["default"] == peft_layers[path].scaling["default"] == pytest.approx(8 / math.sqrt(4))
        a, other = layer.lora_A["default"].weight, peft_layers[path].lora_A["default"].weight
        assert abs(a.std().item() - other.std().item()) < 0.3 * other.std().item()  # both N(0, 1/r)
        assert not layer.lora_B["default"].weight.any() and not peft_layers[path].lora_B["default"].weight.any()
    assert isinstance(next(iter(_lora_layers(ours).values())), LoraLinear)
