"""The command line: `lorakit merge` writes a model plain transformers loads and that matches."""

import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli.main import main

from .conftest import FAMILIES, randomize_adapters


@pytest.fixture
def base_and_adapter(tmp_path):
    family = FAMILIES["llama"]
    model = family.build()
    model.save_pretrained(tmp_path / "base")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=family.targets, init="random"))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path


def test_merge_exports_plain_model(base_and_adapter, capsys):
    adapted, tmp = base_and_adapter
    code = main(["merge", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--out", str(tmp / "m")])
    assert code == 0
    assert "max |logit diff| vs adapted model" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(tmp / "m")  # plain transformers
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    inputs = FAMILIES["llama"].inputs()
    assert_close(FAMILIES["llama"].logits(merged), FAMILIES["llama"].logits(adapted, inputs), rtol=0, atol=1e-4)


def test_merge_bfloat16_and_existing_out(base_and_adapter, capsys):
    _, tmp = base_and_adapter
    args = ["merge", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--out", str(tmp / "m")]
    assert main([*args, "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp / "m").dtype == torch.bfloat16
    before = sorted(p.name for p in (tmp / "m").iterdir())
    assert main(args) == 2
    assert "already exists; choose another directory or pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp / "m").iterdir()) == before
    assert main([*args, "--overwrite"]) == 0


def test_merge_errors_are_one_line(tmp_path, capsys):
    assert main(["merge", "--model", str(tmp_path / "none"), "--adapter", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit merge: error: --model") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, check=True)
    assert "merge" in out.stdout


def test_eval_show_prints_as_many_samples_as_asked_with_their_questions(tiny_lm_dir, tmp_path, capsys):
    """`lorakit eval --show 8` printed 3 samples, and of a two-line prompt the line before the question."""
    import json

    rows = [{"prompt": f"Items have colours.\nWhat colour is item {i}?", "completion": "red"} for i in range(10)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "--model", str(tiny_lm_dir), "--data", str(data), "--max-new-tokens", "2"]
    assert main([*args, "--show", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    wants = [i for i, line in enumerate(lines) if line.lstrip().startswith("want 'red'")]
    assert len(wants) == 8
    assert [f"What colour is item {i}?" in lines[w - 1] for i, w in enumerate(wants)] == [True] * 8
    assert main([*args, "--show", "20"]) == 0
    assert capsys.readouterr().out.count("want 'red'") == 10  # as many as there are
    assert main([*args, "--show", "-1"]) == 2
    assert "--show must be >= 0" in capsys.readouterr().err
