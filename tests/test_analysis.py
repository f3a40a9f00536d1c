"""lorakit inspect: per-layer statistics from the adapter file against direct computation on the full update."""

import json
import math

import pytest
import torch
from PIL import Image

import lorakit
from lorakit.analysis import format_table, heat_map, inspect_adapter
from lorakit.cli.main import main as cli_main

from .conftest import FAMILIES, randomize_adapters

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _saved(tmp_path, name="a", seed=123, **config):
    model = FAMILIES["llama"].build()
    settings = {"r": 4, "alpha": 8.0, "target_modules": TARGETS, "init": "random"} | config
    lorakit.inject(model, lorakit.LoraConfig(**settings))
    randomize_adapters(model, seed=seed)
    return model, lorakit.save_adapter(model, tmp_path / name)


def test_statistics_equal_the_full_update_svd(tmp_path):
    model, directory = _saved(tmp_path, rank_pattern={"down_proj": 2}, use_rslora=True)
    result = inspect_adapter(directory, top_k=2)
    layers = {p: m for p, m in model.named_modules() if isinstance(m, lorakit.layers.LoraLayer)}
    assert [s.path for s in result.layers] == sorted(layers)
    for stats in result.layers:
        layer = layers[stats.path]
        delta = layer.delta_weight("default").double()
        sigma = torch.linalg.svdvals(delta)[: layer.r["default"]]
        assert stats.rank == layer.r["default"] and stats.scaling == pytest.approx(layer.scaling["default"])
        assert stats.norm == pytest.approx(delta.norm().item(), rel=1e-5)
        p = sigma / sigma.sum()
        assert stats.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-4)
        energy = sigma.square() / sigma.square().sum()
        assert stats.energy_top1 == pytest.approx(energy[0].item(), rel=1e-4)
        assert stats.energy_topk == pytest.approx(energy[:2].sum().item(), rel=1e-4)
        assert 1 <= stats.effective_rank <= stats.rank + 1e-6
    assert "layers; total ||dW||" in format_table(result)


def test_effective_rank_of_a_rank_one_update_is_one(tmp_path):
    model = FAMILIES["llama"].build()
    lorakit.inject(model, lorakit.LoraConfig(r=3, target_modules=["q_proj"], init="random"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lorakit.layers.LoraLayer):
                m.lora_B["default"].weight[:, 1:] = 0  # only the first direction remains
    stats = inspect_adapter(lorakit.save_adapter(model, tmp_path / "one")).layers[0]
    assert stats.effective_rank == pytest.approx(1.0, abs=1e-6) and stats.energy_top1 == pytest.approx(1.0)


def test_compare_gives_layerwise_cosine(tmp_path):
    model, first = _saved(tmp_path, "a")
    _, second = _saved(tmp_path, "b", seed=7, target_modules=["q_proj", "v_proj"])
    other = FAMILIES["llama"].build()
    lorakit.load_adapter(other, second)
    layers = {p: m for p, m in model.named_modules() if isinstance(m, lorakit.layers.LoraLayer)}
    others = {p: m for p, m in other.named_modules() if isinstance(m, lorakit.layers.LoraLayer)}
    result = inspect_adapter(first, compare=second)
    for stats in result.layers:
        if stats.path not in others:
            assert stats.cosine is None
            continue
        d1, d2 = layers[stats.path].delta_weight("default"), others[stats.path].delta_weight("default")
        expected = (d1 * d2).sum() / (d1.norm() * d2.norm())
        assert stats.cosine == pytest.approx(expected.item(), abs=1e-5)
    assert result.only_here == sorted(p for p in layers if p not in others) and result.only_there == []
    self_compare = inspect_adapter(first, compare=first)
    assert all(s.cosine == pytest.approx(1.0) for s in self_compare.layers)
    assert "mean cosine with" in format_table(result)


def test_model_adds_relative_norm(tmp_path):
    _model, directory = _saved(tmp_path)
    base = FAMILIES["llama"].build()
    result = inspect_adapter(directory, model=base)
    stats = result.layers[0]
    weight = base.get_submodule(stats.path).weight
    assert stats.relative_norm == pytest.approx(stats.norm / weight.norm().item(), rel=1e-5)
    with pytest.raises(ValueError, match="no module .*right base model"):
        inspect_adapter(directory, model=FAMILIES["gpt2"].build())


def test_heat_map_and_cli(tmp_path, capsys, monkeypatch):
    _, first = _saved(tmp_path, "a")
    _, second = _saved(tmp_path, "b", seed=9)
    png = heat_map(inspect_adapter(first, compare=second), tmp_path / "map.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100
    monkeypatch.chdir(tmp_path)
    assert cli_main(["inspect", str(first), "--compare", str(second), "--json", "stats.json", "--top", "2"]) == 0
    out = capsys.readouterr()
    assert "eff.rank" in out.out and "cosine" in out.out and "top2" in out.out
    assert (tmp_path / "inspect-a.png").is_file()
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert len(stats["layers"]) == 2 * len(TARGETS) and stats["compared"] == str(second)


def test_bad_inputs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["inspect", str(tmp_path / "empty")]) == 2
    assert "is not an adapter directory" in capsys.readouterr().err
    assert cli_main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    _, directory = _saved(tmp_path)
    with pytest.raises(ValueError, match="top_k=0 is invalid"):
        inspect_adapter(directory, top_k=0)


def test_layers_sort_by_number_not_as_text(tmp_path):
    """Layers 0, 1, 2, ..., 10, 11, not 0, 1, 10, 11, 2 (a model of 12 blocks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=12,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)  # fmt: skip
    model = LlamaForCausalLM(config)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init="random"))
    directory = lorakit.save_adapter(model, tmp_path / "deep")
    result = inspect_adapter(directory)
    want = [f"model.layers.{i}.self_attn.{m}" for i in range(12) for m in ("q_proj", "v_proj")]
    assert [s.path for s in result.layers] == want
    assert [line.split()[0] for line in format_table(result).splitlines()[1:-1]] == want
    from lorakit.analysis import natural_key

    assert sorted(["h.10.a", "h.9.b", "h.2.a", "h.2"], key=natural_key) == ["h.2", "h.2.a", "h.9.b", "h.10.a"]
