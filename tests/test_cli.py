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
    err = capsys.readouterr().err
    diff = float(err.split("max |logit diff| vs adapted model = ")[1].split()[0])
    assert diff <= 1e-4  # the command's own check: the reloaded merged model gives the adapted model's logits
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


SUBCOMMANDS = ["train", "eval", "generate", "merge", "export", "combine", "inspect", "compare", "serve", "bench", "ui"]


def test_console_script_runs(capsys):
    """`lorakit --help` lists every subcommand with its help line, `--version` prints lorakit's version, and the
    `lorakit` console script is the entry point they run."""
    import os
    import re
    from importlib.metadata import entry_points, version

    from lorakit.cli.main import SUBCOMMANDS as modules

    assert list(modules) == SUBCOMMANDS
    env = {**os.environ, "COLUMNS": "200"}  # argparse wraps the help to the terminal's width
    out = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith("usage: lorakit [-h] [--version] COMMAND ...\n")
    listed = re.findall(r"^ {4}(\w+) +(\S.*)$", out.stdout, flags=re.MULTILINE)
    assert listed == [(name, modules[name].HELP) for name in SUBCOMMANDS]
    assert all(len(help_line) > 10 for _, help_line in listed)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"lorakit {lorakit.__version__}\n"
    assert lorakit.__version__ == version("lorakit")  # the installed distribution's version
    (script,) = entry_points(group="console_scripts", name="lorakit")
    assert script.value == "lorakit.cli.main:main"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "lorakit: error: the following arguments are required: COMMAND"),
        (["nosuch"], "lorakit: error: argument COMMAND: invalid choice: 'nosuch' (choose from 'train', 'eval',"),
        (["train", "--nosuch"], "lorakit: error: unrecognized arguments: --nosuch"),
    ],
)
def test_a_wrong_command_line_is_a_usage_error_with_exit_code_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lorakit") and words in err, err


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


# ----- --precision (issue 28) --------------------------------------------------------------------------------
@pytest.fixture
def tiny_adapter_and_rows(tiny_lm_dir, tmp_path):
    """An adapter with visible effect on tiny_lm_dir (all seven projections), and a file of chat rows."""
    from .conftest import colour_rows, write_jsonl

    model, _ = lorakit.load_model(tiny_lm_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=targets, init="random"))
    randomize_adapters(model, scale=0.1)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", write_jsonl(tmp_path / "rows.jsonl", colour_rows(12, seed=1))


def test_eval_and_generate_in_bf16_agree_with_fp32(tiny_lm_dir, tiny_adapter_and_rows, capsys):
    """`--precision bf16-mixed` (and pure bf16) loads the base in bfloat16 and computes under autocast: the
    command names its precision, and its loss and greedy answers are fp32's to bf16 rounding."""
    import difflib
    import json

    from lorakit.precision import decide

    adapter, rows = tiny_adapter_and_rows
    model = ["--model", str(tiny_lm_dir), "--adapter", str(adapter)]
    losses, texts = {}, {}
    for precision in ("fp32", "bf16-mixed", "bf16"):
        assert main(["eval", *model, "--data", str(rows), "--json", "--precision", precision]) == 0
        out, err = capsys.readouterr()
        assert err.count("precision: ") == 1 and f"precision: {precision}\n" in err
        losses[precision] = json.loads(out)["loss"]
        chat = ["--chat", "colour of item 2?", "--max-new-tokens", "12"]
        assert main(["generate", *model, *chat, "--precision", precision, "--weights", "precision"]) == 0
        out, err = capsys.readouterr()
        assert f"precision: {precision}\n" in err
        texts[precision] = out.strip()
    for precision in ("bf16-mixed", "bf16"):
        assert losses[precision] == pytest.approx(losses["fp32"], rel=1e-2), precision
        assert difflib.SequenceMatcher(None, texts[precision], texts["fp32"]).ratio() >= 0.75, texts
    assert main(["eval", *model, "--data", str(rows), "--json", "--no-generate"]) == 0  # default: auto
    out, err = capsys.readouterr()
    auto = decide("auto", "cuda" if torch.cuda.is_available() else "cpu")
    assert [line for line in err.splitlines() if line.startswith("precision: ")] == [auto.describe()]
    assert json.loads(out)["loss"] == pytest.approx(losses[auto.name], rel=1e-6)  # as when named


@pytest.mark.parametrize("command", ["generate", "eval", "merge", "export"])
def test_fp16_mixed_on_a_cpu_is_one_error_line_before_anything_loads(tmp_path, capsys, command):
    """A missing model and adapter show that the precision is refused first, with the way out."""
    args = {
        "generate": ["--prompt", "hi"],
        "eval": ["--data", str(tmp_path / "rows.jsonl")],
        "merge": ["--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "o")],
        "export": ["--adapter", str(tmp_path / "a"), "--format", "vllm", "--out", str(tmp_path / "o")],
    }[command]
    assert main([command, "--model", str(tmp_path / "none"), *args, "--precision", "fp16-mixed"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "Traceback" not in err
    assert err.startswith(f"lorakit {command}: error: precision=fp16-mixed needs a CUDA device")
    assert "use precision=bf16-mixed (or auto) on a CPU" in err
    assert not (tmp_path / "o").exists()


def test_merge_is_exact_whatever_the_precision_of_its_check(base_and_adapter, capsys):
    """merge --precision bf16-mixed: the written weights are the float32 merge's, bit for bit; only the check's
    forwards (adapted model and reloaded file, each stored in bfloat16) compute under autocast."""
    from safetensors.torch import load_file

    _, tmp = base_and_adapter
    args = ["merge", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter")]
    assert main([*args, "--out", str(tmp / "fp32")]) == 0
    fp32_err = capsys.readouterr().err
    assert "precision: fp32\n" in fp32_err and "(both computed in" not in fp32_err
    assert main([*args, "--out", str(tmp / "mixed"), "--precision", "bf16-mixed"]) == 0
    err = capsys.readouterr().err
    assert "precision: bf16-mixed\n" in err and "(both computed in bf16-mixed)" in err
    diff = float(err.split("max |logit diff| vs adapted model = ")[1].split()[0])
    assert 0 < diff < 5e-2  # bf16 rounding of both forwards, not a wrong merge
    written, reference = load_file(tmp / "mixed" / "model.safetensors"), load_file(tmp / "fp32" / "model.safetensors")
    assert written.keys() == reference.keys()
    assert all(torch.equal(written[k], reference[k]) for k in reference)


def test_compare_trains_and_times_every_method_in_the_configs_precision(run_config, tmp_path, capsys):
    """compare takes the run config's precision (no option of its own): the trainer trains in it, and the
    latency of the trained model is measured against a base stored and computing the same way."""
    import json

    cfg = run_config()
    sets = [f"model={cfg.model}", f"data.train={cfg.data.train}", f"data.eval={cfg.data.eval}", "data.max_length=32",
            "lora.r=4", "train.max_steps=2", "train.max_new_tokens=2", "compare.latency_repeats=1",
            f"output_dir={tmp_path / 'cmp'}", "precision=bf16-mixed"]  # fmt: skip
    assert main(["compare", "--no-progress", "--methods", "lora", *[a for s in sets for a in ("--set", s)]]) == 0
    (record,) = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert record["status"] == "ok" and record["precision"] == "bf16-mixed"
    assert record["latency_vs_base"] > 0 and record["latency_merged_vs_base"] > 0
    assert "Precision: bf16-mixed" in (tmp_path / "cmp" / "results.md").read_text()
