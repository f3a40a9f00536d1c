import math

import pytest

from lorakit import LoraConfig


def test_defaults_and_scaling():
    c = LoraConfig(r=16, alpha=32)
    assert c.scaling(16, 32) == 2.0
    rs = LoraConfig(r=16, alpha=32, use_rslora=True)
    assert rs.scaling(16, 32) == pytest.approx(32 / math.sqrt(16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"r": -3}, "r=-3 is invalid"),
        ({"r": 2.5}, "r must be an integer"),
        ({"alpha": 0}, "alpha=0 is invalid"),
        ({"alpha": float("nan")}, "alpha=nan is invalid"),
        ({"dropout": 1.0}, "dropout=1.0 is invalid"),
        ({"dropout": -0.1}, "dropout=-0.1 is invalid"),
        ({"init": "xavier"}, "init='xavier' is not a known method"),
        ({"bias": "some"}, "bias='some' is not valid"),
        ({"target_modules": "q_proj("}, "not a valid regular expression"),
        ({"target_modules": []}, "empty list"),
        ({"target_modules": [""]}, "non-empty strings"),
        ({"exclude_modules": "["}, "not a valid regular expression"),
        ({"rank_pattern": {"q(": 4}}, "rank_pattern key 'q(' is not a valid regular expression"),
        ({"rank_pattern": {"q": 0}}, "ranks are integers >= 1"),
        ({"alpha_pattern": {"q": -1}}, "alphas are numbers > 0"),
        ({"layers_to_transform": [-1]}, "layers_to_transform=[-1] is invalid"),
        ({"layers_pattern": "layers"}, "layers_pattern is set but layers_to_transform is not"),
    ],
)
def test_invalid_values_name_the_value(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace("[", r"\[")):
        LoraConfig(**kwargs)


def test_normalisation():
    c = LoraConfig(target_modules="ALL-LINEAR", layers_to_transform=1, layers_pattern="h", modules_to_save="score")
    assert c.target_modules == "all-linear"
    assert c.layers_to_transform == [1]
    assert c.layers_pattern == ["h"]
    assert c.modules_to_save == ["score"]
    assert LoraConfig(target_modules={"v", "q"}).target_modules == ["q", "v"]


def test_rank_and_alpha_patterns_follow_peft_rule():
    c = LoraConfig(r=8, alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.mlp\..*": 2}, alpha_pattern={"k_proj": 3})
    assert c.rank_and_alpha("model.layers.0.self_attn.q_proj") == (4, 16)
    assert c.rank_and_alpha("model.layers.1.mlp.up_proj") == (2, 16)
    assert c.rank_and_alpha("model.layers.0.self_attn.k_proj") == (8, 3)
    # a pattern matches whole dotted components at the end of the path, not arbitrary substrings
    assert c.rank_and_alpha("model.layers.0.self_attn.xq_proj") == (8, 16)
