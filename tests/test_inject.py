"""Target matching on the four families, and the errors for patterns that miss."""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import LoraLayer
from lorakit.state import registry

from .conftest import FAMILIES, randomize_adapters


def _wrapped(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoraLayer))


def _suffix_paths(model, suffixes):
    return sorted(p for p, _ in model.named_modules() if p.rsplit(".", 1)[-1] in suffixes)


def test_right_modules_are_wrapped(family):
    model = family.build()
    expected = _suffix_paths(model, family.targets)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets))
    assert _wrapped(model) == expected and expected


def test_only_lora_parameters_train(family):
    model = family.build()
    cfg = lorakit.LoraConfig(r=2, target_modules=family.targets, modules_to_save=family.modules_to_save)
    lorakit.inject(model, cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert ".lora_" in name or ".modules_to_save." in name, name
    summary = lorakit.trainable_summary(model)
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < summary.percent < 100


def test_base_weights_bit_identical_after_optimizer_step(family):
    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=family.targets, init="random"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    out = model(**family.inputs()).logits
    out.float().pow(2).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)


def test_output_equals_base_at_initialisation(family):
    model = family.build()
    want = family.logits(model)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=family.targets))
    assert torch.equal(family.logits(model), want)


def test_wrapped_layer_matches_formula_with_random_b(family):
    model = family.build()
    cfg = lorakit.LoraConfig(r=3, alpha=5.0, target_modules=family.targets, use_rslora=family.name == "llama")
    lorakit.inject(model, cfg)
    randomize_adapters(model)
    path = _wrapped(model)[0]
    layer = model.get_submodule(path)
    d_in, _ = layer.in_out
    x = torch.randn(2, 5, d_in)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = cfg.scaling(3, 5.0)
    with torch.no_grad():
        want = layer.base_layer(x) + scale * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), want)


def test_merge_unmerge_equivalence_and_no_drift(family):
    model = family.build()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=family.targets))
    randomize_adapters(model)
    unmerged = family.logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    lorakit.merge(model)
    merged = family.logits(model)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5 * unmerged.abs().max().item())
    lorakit.unmerge(model)
    for _ in range(100):
        lorakit.merge(model)
        lorakit.unmerge(model)
    after = family.logits(model)
    torch.testing.assert_close(after, unmerged, rtol=1e-5, atol=1e-5 * unmerged.abs().max().item())
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-5, atol=1e-6)


def _adapter_and_base_dtypes(model):
    trained = ("lora_", ".modules_to_save.")
    adapters = {p.dtype for n, p in model.named_parameters() if any(t in n for t in trained)}
    base = {p.dtype for n, p in model.named_parameters() if not any(t in n for t in trained)}
    return adapters, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapters_train_in_float32_over_a_bf16_base_and_the_base_keeps_its_dtype(family, dtype):
    """The default adapter dtype (PEFT's autocast_adapter_dtype=True): float32 over a bf16 base, modules_to_save
    copies too; without autocast each update is computed in float32 and comes back in the base's dtype."""
    model = family.build(dtype=dtype)
    config = lorakit.LoraConfig(r=2, target_modules=family.targets, modules_to_save=family.modules_to_save)
    lorakit.inject(model, config)
    randomize_adapters(model)
    assert _adapter_and_base_dtypes(model) == ({torch.float32}, {dtype})
    assert family.logits(model).dtype == dtype
    lorakit.merge(model)
    assert _adapter_and_base_dtypes(model) == ({torch.float32}, {dtype})


def test_adapter_dtype_base_follows_the_base(family):
    """adapter_dtype="base": everything in the base's dtype (precision=bf16), as before mixed precision."""
    model = family.build(dtype=torch.bfloat16)
    config = lorakit.LoraConfig(r=2, target_modules=family.targets, modules_to_save=family.modules_to_save)
    lorakit.inject(model, config, adapter_dtype="base")
    assert _adapter_and_base_dtypes(model) == ({torch.bfloat16}, {torch.bfloat16})
    assert family.logits(model).dtype == torch.bfloat16
    lorakit.merge(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize(
    ("base", "adapter_dtype", "expected"),
    [
        (torch.float16, None, torch.float32),
        (torch.float64, None, torch.float64),
        (torch.float32, torch.float64, torch.float64),
        (torch.bfloat16, torch.float16, torch.float16),
        (torch.float16, "base", torch.float16),
    ],
)
def test_adapter_dtype_choices(base, adapter_dtype, expected):
    model = FAMILIES["llama"].build(dtype=base)
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"])
    lorakit.inject(model, config, adapter_dtype=adapter_dtype)
    assert _adapter_and_base_dtypes(model) == ({expected}, {base})


@pytest.mark.parametrize("bad", ["fp32", "float32", torch.int8, torch.complex64, 32])
def test_an_invalid_adapter_dtype_is_refused_before_anything_changes(bad):
    model = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match=r"adapter_dtype=.* is invalid: use None .*'base'.*torch.float32"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter_dtype=bad)
    assert not _wrapped(model) and "_lorakit_registry" not in model.__dict__


def test_dora_and_pissa_tensors_follow_the_adapter_dtype():
    """DoRA's magnitude and PiSSA's initial factors are adapter tensors too."""
    model = FAMILIES["llama"].build(dtype=torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init="pissa"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector["default"].dtype == torch.float32
    a0, b0 = layer.variants["default"][0].initial_factors(layer, "default")
    assert a0.dtype == b0.dtype == layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16


def test_all_linear_skips_output_head():
    model = FAMILIES["llama"].build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    wrapped = _wrapped(model)
    assert "lm_head" not in wrapped
    assert len(wrapped) == 2 * 7
    bert = FAMILIES["bert"].build()
    lorakit.inject(bert, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert "classifier" not in _wrapped(bert) and "bert.pooler.dense" in _wrapped(bert)
    gpt2 = FAMILIES["gpt2"].build()
    lorakit.inject(gpt2, lorakit.LoraConfig(r=2, target_modules="all-linear"))
    assert len(_wrapped(gpt2)) == 2 * 4 and "lm_head" not in _wrapped(gpt2)


def test_regex_exclude_layers_and_patterns():
    model = FAMILIES["llama"].build()
    cfg = lorakit.LoraConfig(
        r=4,
        target_modules=r".*\.(q_proj|v_proj|up_proj)",
        exclude_modules=["up_proj"],
        layers_to_transform=[1],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 1.0},
    )
    lorakit.inject(model, cfg)
    assert _wrapped(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    q = model.get_submodule("model.layers.1.self_attn.q_proj")
    v = model.get_submodule("model.layers.1.self_attn.v_proj")
    assert q.r["default"] == 2 and q.scaling["default"] == 16 / 2
    assert v.r["default"] == 4 and v.scaling["default"] == 1.0 / 4


def test_layers_pattern_names_the_block_list():
    model = FAMILIES["gpt2"].build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"], layers_to_transform=0, layers_pattern="h"))
    assert _wrapped(model) == ["transformer.h.0.attn.c_attn"]


def test_unknown_target_names_it_and_suggests_close_names():
    model = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match=r"'q_prj' \(did you mean 'q_proj'") as err:
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_prj", "v_proj"]))
    assert str(err.value).startswith("target_modules entry 'q_prj' ")  # v_proj matched, so it is not named
    assert not _wrapped(model)  # nothing changed


def test_each_list_entry_must_match():
    model = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match="'wq' .*matched no module"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj", "wq"]))


def test_regex_that_matches_nothing():
    model = FAMILIES["t5"].build()
    with pytest.raises(ValueError, match="regex 'q_proj' matches no module path"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules="q_proj"))


def test_unsupported_layer_type_lists_supported_ones():
    model = FAMILIES["llama"].build()
    with pytest.raises(ValueError, match=r"self_attn \(LlamaAttention\).*Supported types: .*Linear"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["self_attn"]))
    assert not _wrapped(model) and all(p.requires_grad for p in model.parameters())


def test_rank_larger_than_layer_warns():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.warns(UserWarning, match="rank exceeds min"):
        lorakit.inject(model, lorakit.LoraConfig(r=8, target_modules=["0"]))
    assert model[0].lora_A["default"].weight.shape == (8, 4)


def test_name_in_use_and_bad_names():
    model = FAMILIES["llama"].build()
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'default' is already in use"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="without dots"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["v_proj"]), name="a.b")
    with pytest.raises(TypeError, match="must be a lorakit.LoraConfig"):
        lorakit.inject(model, {"r": 2}, name="x")


def test_second_adapter_reuses_wrappers():
    model = FAMILIES["llama"].build()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["q_proj", "v_proj"]), "b")
    q = model.model.layers[0].self_attn.q_proj
    assert sorted(q.adapter_names) == ["a", "b"] and q.active_adapters == ["b"]
    assert not isinstance(q.base_layer, LoraLayer)
    assert sorted(registry(model).adapters) == ["a", "b"]


def test_modules_to_save_trains_a_copy():
    model = FAMILIES["bert"].build()
    original = model.classifier.weight.detach().clone()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    copy = model.classifier.modules_to_save["default"]
    assert copy.weight.requires_grad and not model.classifier.original_module.weight.requires_grad
    with torch.no_grad():
        copy.weight.add_(1.0)
    assert torch.equal(model.classifier.weight, original)  # attribute passthrough reaches the original
    changed = FAMILIES["bert"].logits(model)
    with lorakit.disabled(model):
        base = FAMILIES["bert"].logits(model)
    assert not torch.allclose(changed, base)
    with pytest.raises(ValueError, match="'clasifier' \\(did you mean 'classifier'"):
        lorakit.inject(
            FAMILIES["bert"].build(),
            lorakit.LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]),
        )


def test_injection_keeps_the_model_mode():
    llama = FAMILIES["llama"]
    model = llama.build()  # eval mode
    lorakit.inject(model, lorakit.LoraConfig(r=2, dropout=0.5, target_modules=llama.targets, init="random"), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, dropout=0.5, target_modules=llama.targets, init="random"), "b")
    assert not any(m.training for m in model.modules())
    first = llama.logits(model)
    assert torch.equal(llama.logits(model), first)  # no dropout at inference
    model.train()
    assert all(m.training for m in model.modules())


def test_the_registry_survives_deepcopy_and_unload_restores_the_copys_own_flags():
    """The original requires_grad flags are kept by parameter name, so a deep copy's unload restores them
    (keyed by object identity they would be lost: the copy's parameters are new objects)."""
    model = FAMILIES["llama"].build()
    model.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice, to be given back
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    twin = copy.deepcopy(model)
    del model
    assert sorted(registry(twin).adapters) == ["default"]
    lorakit.unload(twin, merge=False)
    flags = {n: p.requires_grad for n, p in twin.named_parameters()}
    assert flags.pop("model.embed_tokens.weight") is False and all(flags.values())


def test_print_model_shows_every_change_lorakit_made():
    model = FAMILIES["llama"].build()
    plain = str(model)
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=targets))
    text = str(model)  # identical decoder blocks print once ("(0-1): 2 x LlamaDecoderLayer")
    assert text.count("LoraLinear(") == len(targets) and "2 x LlamaDecoderLayer" in text
    assert "(q_proj): LoraLinear(\n            adapters=[default: r=2, scaling=8]" in text
    assert "shared input with k_proj, v_proj" in text and "shared input with q_proj, v_proj" in text
    for path, module in model.named_modules():
        if path.endswith(tuple(targets)):
            assert "adapters=[default: r=2" in repr(module).splitlines()[1], path
    lorakit.fuse_forwards(model)
    for module in model.modules():
        name = type(module).__name__
        if name in ("LlamaMLP", "LlamaRMSNorm"):
            label = "fused gated MLP" if name == "LlamaMLP" else "fused RMS norm"
            assert f"lorakit: {label}" in repr(module).splitlines()[1 if name == "LlamaMLP" else 0], name
    assert "(mlp): LlamaMLP(\n          lorakit: fused gated MLP" in str(model)
    lorakit.unload(model, merge=False)
    assert str(model) == plain


def _tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_a_head_tied_to_the_embedding_is_refused_with_the_reason():
    """The embedded model's case (SmolLM2, GPT-2): such an adapter would train, then merge and GGUF fail."""
    llama = _tied_llama()
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"lm_head: its weight is tied to the input embedding model\.embed_tokens"):
        lorakit.inject(llama, lorakit.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert _wrapped(llama) == [] and "_lorakit_registry" not in llama.__dict__  # nothing changed
    gpt2 = FAMILIES["gpt2"].build()
    with pytest.raises(ValueError, match=r"tied to the input embedding transformer\.wte .*Leave it out"):
        lorakit.inject(gpt2, lorakit.LoraConfig(r=2, target_modules=r".*(c_attn|lm_head)"))


def test_untied_heads_embeddings_and_saved_heads_are_still_accepted():
    untied = FAMILIES["llama"].build()  # tie_word_embeddings=False: its head has its own weight
    lorakit.inject(untied, lorakit.LoraConfig(r=2, target_modules=["lm_head"]))
    assert _wrapped(untied) == ["lm_head"]
    tied = _tied_llama()
    lorakit.inject(tied, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "saved")
    lorakit.inject(tied, lorakit.LoraConfig(r=2, target_modules=["embed_tokens"]), "embedding")
    assert _wrapped(tied) == [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
