"""lorakit.combine against each method's definition and against PEFT's add_weighted_adapter."""

import peft
import pytest
import torch
from torch.testing import assert_close

import lorakit
from lorakit.cli.main import main as cli_main
from lorakit.combine import METHODS, combine
from lorakit.layers import LoraLayer

from .conftest import FAMILIES, randomize_adapters

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _two_adapters(first=None, second=None, seed=0):
    """A tiny LLaMA with adapters 'a' and 'b' holding random non-zero factors."""
    model = FAMILIES["llama"].build(seed=seed)
    first = first or {"r": 4, "alpha": 8.0, "target_modules": TARGETS}
    second = second or {"r": 4, "alpha": 6.0, "target_modules": TARGETS, "use_rslora": True}
    lorakit.inject(model, lorakit.LoraConfig(init="random", **first), "a")
    lorakit.inject(model, lorakit.LoraConfig(init="random", **second), "b")
    randomize_adapters(model)
    return model


def _lora_layers(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, LoraLayer)}


def _weighted_sum(layer, weights):
    return sum(w * layer.delta_weight(a) for a, w in weights.items() if a in layer.r)


def test_cat_is_exact_for_different_ranks_and_targets():
    model = _two_adapters(second={"r": 2, "alpha": 3.0, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    weights = {"a": 0.7, "b": -0.4}
    report = combine(model, weights, "c", "cat")
    layers = _lora_layers(model)
    for path, layer in layers.items():
        assert_close(layer.delta_weight("c"), _weighted_sum(layer, weights), rtol=1e-5, atol=1e-6, msg=path)
        assert report.ranks[path] == 4 + (2 if "b" in layer.r else 0) == layer.r["c"]
    assert lorakit.active_adapters(model) == ["b"]  # the new adapter is not activated
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".c." in n or n.endswith(".c"))


def test_cat_output_equals_both_adapters_active():
    model = _two_adapters()
    combine(model, {"a": 1.0, "b": 1.0}, "c", "cat")
    inputs = FAMILIES["llama"].inputs()
    lorakit.set_active(model, ["a", "b"])
    both = FAMILIES["llama"].logits(model, inputs)
    lorakit.set_active(model, "c")
    assert_close(FAMILIES["llama"].logits(model, inputs), both, rtol=1e-5, atol=1e-5)


def test_svd_truncates_the_exact_sum_to_the_best_rank_k():
    model = _two_adapters()
    weights = {"a": 0.5, "b": 1.5}
    report = combine(model, weights, "full", "svd", rank=8)
    truncated = combine(model, weights, "low", "svd", rank=3)
    for path, layer in _lora_layers(model).items():
        exact = _weighted_sum(layer, weights)
        assert_close(layer.delta_weight("full"), exact, rtol=1e-4, atol=1e-5, msg=path)
        assert report.truncation_error[path] < 1e-5
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert layer.r["low"] == 3
        assert_close(layer.delta_weight("low"), best, rtol=1e-4, atol=1e-5, msg=path)
        expected_error = (s[3:].square().sum() / s.square().sum()).sqrt().item()
        assert truncated.truncation_error[path] == pytest.approx(expected_error, rel=1e-4, abs=1e-7)
    assert "SVD truncation error" in truncated.describe()


def test_linear_ties_and_dare_follow_their_definitions():
    model = _two_adapters()
    layer = model.model.layers[0].self_attn.q_proj
    a1, b1 = layer.lora_A["a"].weight.detach(), layer.lora_B["a"].weight.detach()
    a2, b2 = layer.lora_A["b"].weight.detach(), layer.lora_B["b"].weight.detach()
    s1, s2 = layer.scaling["a"], layer.scaling["b"]
    combine(model, {"a": 0.6, "b": -0.2}, "lin", "linear")
    w1, w2 = (0.6 * s1) ** 0.5, (0.2 * s2) ** 0.5
    assert_close(layer.lora_A["lin"].weight, w1 * a1 - w2 * a2)
    assert_close(layer.lora_B["lin"].weight, w1 * b1 + w2 * b2)

    combine(model, {"a": 1.0, "b": 1.0}, "ties", "ties", density=0.5)
    pruned = []
    for a in (a1, a2):  # keep the top half by magnitude
        keep = a.abs() >= a.abs().flatten().kthvalue(a.numel() - a.numel() // 2 + 1).values
        pruned.append(a * keep)
    stacked = torch.stack(pruned)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    weighted = torch.stack([pruned[0] * s1**0.5, pruned[1] * s2**0.5])
    expected = (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert_close(layer.lora_A["ties"].weight, expected)

    combine(model, {"a": 1.0, "b": 1.0}, "dare", "dare_linear", density=0.25, seed=3)
    dare_a = layer.lora_A["dare"].weight.detach()
    kept = (dare_a != 0).float().mean().item()
    assert 0.2 < kept < 0.8  # of two inputs each kept with p = 0.25: 1 - 0.75^2 = 0.44 expected
    combine(model, {"a": 1.0, "b": 1.0}, "dare2", "dare_linear", density=0.25, seed=3)
    assert torch.equal(layer.lora_A["dare2"].weight, layer.lora_A["dare"].weight)  # seeded: repeatable
    combine(model, {"a": 1.0, "b": 1.0}, "dare_all", "dare_linear", density=1.0)
    combine(model, {"a": 1.0, "b": 1.0}, "lin_all", "linear")
    assert torch.equal(layer.lora_A["dare_all"].weight, layer.lora_A["lin_all"].weight)


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("linear", {}),
        ("cat", {}),
        ("svd", {"rank": 6}),
        ("ties", {"density": 0.5}),
        ("ties_svd", {"density": 0.5, "rank": 4}),
        ("dare_linear", {"density": 0.6}),
        ("dare_linear_svd", {"density": 0.6}),
    ],
)
def test_matches_peft_add_weighted_adapter(method, kwargs, tmp_path, monkeypatch):
    model = _two_adapters()
    original_bernoulli = torch.bernoulli
    calls = []

    def counted_bernoulli(p, generator=None):  # DARE's masks: the n-th call gets the same mask in both libraries
        calls.append(1)
        return original_bernoulli(p, generator=torch.Generator().manual_seed(len(calls)))

    monkeypatch.setattr(torch, "bernoulli", counted_bernoulli)
    lorakit.save_adapter(model, tmp_path / "a", "a")
    lorakit.save_adapter(model, tmp_path / "b", "b")
    peft_model = peft.PeftModel.from_pretrained(FAMILIES["llama"].build(), str(tmp_path / "a"), adapter_name="a")
    peft_model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    weights = {"a": 0.8, "b": -0.5}
    peft_kwargs = {"density": kwargs["density"]} if "density" in kwargs else {}
    if "rank" in kwargs:
        peft_kwargs["svd_rank"] = kwargs["rank"]
    peft_model.add_weighted_adapter(["a", "b"], list(weights.values()), "c", combination_type=method, **peft_kwargs)
    peft_calls, calls[:] = len(calls), []
    combine(model, weights, "c", method, **kwargs)
    assert len(calls) == peft_calls and (peft_calls > 0) == method.startswith("dare")
    peft_layers = {p.removeprefix("base_model.model."): m for p, m in peft_model.named_modules()}
    for path, layer in _lora_layers(model).items():
        theirs = peft_layers[path]
        ours_delta = layer.delta_weight("c")
        assert_close(ours_delta, theirs.get_delta_weight("c"), rtol=1e-4, atol=1e-5, msg=f"{method} {path}")
        if method in ("linear", "ties", "dare_linear"):
            assert_close(layer.lora_A["c"].weight, theirs.lora_A["c"].weight, msg=path)
            assert_close(layer.lora_B["c"].weight, theirs.lora_B["c"].weight, msg=path)


def test_bad_inputs_are_refused_with_the_fix():
    model = _two_adapters(second={"r": 2, "alpha": 4.0, "target_modules": TARGETS})
    with pytest.raises(ValueError, match="needs equal ranks.*use method 'cat' or 'svd'"):
        combine(model, {"a": 1.0, "b": 1.0}, "c", "linear")
    other = _two_adapters(second={"r": 4, "alpha": 4.0, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="same layers.*has no \\['b'\\]"):
        combine(other, {"a": 1.0, "b": 1.0}, "c", "ties", density=0.5)
    with pytest.raises(ValueError, match="needs density"):
        combine(model, {"a": 1.0, "b": 1.0}, "c", "dare_linear")
    with pytest.raises(ValueError, match="density=1.5 is invalid"):
        combine(model, {"a": 1.0, "b": 1.0}, "c", "ties", density=1.5)
    with pytest.raises(ValueError, match="method='average' is not known"):
        combine(model, {"a": 1.0}, "c", "average")
    with pytest.raises(ValueError, match="rank is only used by the SVD methods"):
        combine(model, {"a": 1.0}, "c", "cat", rank=3)
    with pytest.raises(ValueError, match="finite number"):
        combine(model, {"a": float("nan")}, "c", "cat")
    with pytest.raises(ValueError, match="non-empty dict"):
        combine(model, {}, "c", "cat")
    with pytest.raises(ValueError, match="zzz"):
        combine(model, {"zzz": 1.0}, "c", "cat")
    with pytest.raises(ValueError, match="in use"):
        combine(model, {"a": 1.0}, "b", "cat")
    assert lorakit.active_adapters(model) == ["b"] and "c" not in _lora_layers(model)["model.layers.0.mlp.up_proj"].r
    saved = FAMILIES["bert"].build()
    lorakit.inject(saved, lorakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "x")
    with pytest.raises(ValueError, match="modules_to_save"):
        combine(saved, {"x": 1.0}, "y", "cat")
    assert set(METHODS) >= {"linear", "cat", "svd", "ties", "dare_linear"}


def test_cli_combines_saved_adapters(tiny_lm_dir, tmp_path, capsys):
    model, _ = lorakit.load_model(tiny_lm_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="random"), "a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init="random"), "b")
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "a", "a")
    lorakit.save_adapter(model, tmp_path / "b", "b")
    args = [str(tmp_path / "a"), str(tmp_path / "b"), "--model", str(tiny_lm_dir), "--weights", "0.5,2"]
    assert cli_main(["combine", *args, "--method", "svd", "--rank", "3", "--out", str(tmp_path / "c")]) == 0
    captured = capsys.readouterr()
    assert "svd:" in captured.err and "SVD truncation error" in captured.err
    check, _ = lorakit.load_model(tiny_lm_dir)
    lorakit.load_adapter(check, tmp_path / "c", "c")
    q = check.model.layers[0].self_attn.q_proj
    expected = 0.5 * model.model.layers[0].self_attn.q_proj.delta_weight("a")
    expected += 2 * model.model.layers[0].self_attn.q_proj.delta_weight("b")
    u, s, vh = torch.linalg.svd(expected, full_matrices=False)
    assert_close(q.delta_weight("c"), (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-5)
    # bad input: one clear line, rc 2, nothing written
    assert cli_main(["combine", *args, "--method", "linear", "--out", str(tmp_path / "d")]) == 2
    assert "needs equal ranks" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert cli_main(["combine", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    assert "not an adapter directory" in capsys.readouterr().err
    assert cli_main(["combine", *args, "--weights", "1", "--out", str(tmp_path / "f")]) == 2
    assert "1 numbers for 2 adapters" in capsys.readouterr().err
    assert cli_main(["combine", *args, "--out", str(tmp_path / "c")]) == 2
    assert "already holds an adapter" in capsys.readouterr().err
