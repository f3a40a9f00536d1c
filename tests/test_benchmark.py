"""`lorakit bench`: runs each mode in a child process and reports a table; bad input is a clear error."""

from __future__ import annotations

import argparse
import json

import pytest

from lorakit.cli.main import main


def test_bench_reports_every_mode_with_ratios(tiny_lm_dir, tmp_path, capsys):
    raw = tmp_path / "raw.json"
    table = tmp_path / "table.md"
    rc = main(
        ["bench", "--model", str(tiny_lm_dir), "--modes", "lorakit,peft,full,lorakit-hf-loss,base,lorakit-merged,peft-unmerged",
         "--rounds", "1", "--steps", "2", "--batch", "2", "--seq", "8", "--device", "cpu",
         "--json", str(raw), "--markdown", str(table)]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads(raw.read_text())
    summary = result["summary"]
    assert set(summary) == {"lorakit", "peft", "full", "lorakit-hf-loss", "base", "lorakit-merged", "peft-unmerged"}
    for mode, row in summary.items():
        assert len(row["times"]) == 2, mode
        assert row["median_s"] > 0 and row["peak_gb"] > 0
    # the loss check ran on the same tiny model and agreed
    assert result["check"]["ok"] and result["check"]["max_abs_loss_diff"] <= 1e-4
    assert "| lorakit |" in out and "largest loss difference" in out
    assert f"--model {tiny_lm_dir}" in table.read_text()


def test_bench_check_loss_alone(tiny_lm_dir, capsys):
    assert main(["bench", "--model", str(tiny_lm_dir), "--check-loss", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]


@pytest.mark.parametrize(
    "extra, needle",
    [(["--modes", "lorakit,fast"], "unknown --modes ['fast']"), (["--rounds", "0"], "--rounds and --steps")],
)
def test_bench_bad_input_is_one_clear_line(tiny_lm_dir, capsys, extra, needle):
    rc = main(["bench", "--model", str(tiny_lm_dir), "--skip-check", "--device", "cpu", *extra])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_bench_failed_mode_names_it(tmp_path, capsys):
    rc = main(["bench", "--model", str(tmp_path / "missing"), "--skip-check", "--modes", "base", "--rounds", "1",
               "--device", "cpu"])  # fmt: skip
    assert rc == 2
    assert "benchmark mode base failed" in capsys.readouterr().err


def test_peak_rss_is_the_childs_own_not_its_parents():
    """A child of a large parent must not report the parent's resident size as its own peak."""
    import subprocess
    import sys

    from lorakit.tools.benchmark import peak_rss_bytes

    ballast = bytearray(700 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page: 700 MB resident here
    assert peak_rss_bytes() >= 700 * 2**20
    code = "from lorakit.tools.benchmark import peak_rss_bytes; print(peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(child.stdout) < 500 * 2**20  # importing torch takes about 250 MB
    del ballast


# ----- --precision (issue 28) --------------------------------------------------------------------------------
def test_bench_measures_each_precision_in_its_own_rows(tiny_lm_dir, tmp_path, capsys):
    raw, table = tmp_path / "raw.json", tmp_path / "table.md"
    rc = main(["bench", "--model", str(tiny_lm_dir), "--modes", "lorakit,peft", "--precision", "fp32,bf16-mixed",
               "--rounds", "1", "--steps", "1", "--batch", "2", "--seq", "8", "--device", "cpu", "--skip-check",
               "--json", str(raw), "--markdown", str(table)])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "precision: fp32\n" in err and "precision: bf16-mixed\n" in err
    summary = json.loads(raw.read_text())["summary"]
    assert {label: (row["mode"], row["precision"]) for label, row in summary.items()} == {
        "lorakit fp32": ("lorakit", "fp32"),
        "lorakit bf16-mixed": ("lorakit", "bf16-mixed"),
        "peft fp32": ("peft", "fp32"),
        "peft bf16-mixed": ("peft", "bf16-mixed"),
    }
    text = table.read_text()
    assert "--precision fp32,bf16-mixed" in text and "| time vs fp32 | memory vs fp32 |" in text
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert rows["peft bf16-mixed"][4] == "1.00x" and rows["lorakit fp32"][7] == "1.00x"  # vs PEFT, vs fp32


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's call
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bench_modes_store_and_compute_as_each_precision_says(tiny_lm_dir, precision):
    """lorakit and PEFT keep the base in bfloat16 and their adapters float32 under bf16-mixed (PEFT's
    autocast_adapter_dtype=True), bfloat16 under pure bf16; full fine-tuning keeps float32 weights under
    bf16-mixed (classic AMP). A training step runs under autocast and gives a finite loss."""
    import math

    import torch

    from lorakit.precision import decide
    from lorakit.tools.benchmark import _train_steps, batch_for, build

    p = decide(precision, "cpu")
    adapter_dtype = torch.float32 if precision == "bf16-mixed" else torch.bfloat16
    for mode in ("lorakit", "peft"):
        model = build(mode, "cpu", p, model_name=str(tiny_lm_dir))
        params = dict(model.named_parameters())
        assert {q.dtype for n, q in params.items() if "lora_" in n} == {adapter_dtype}, mode
        assert {q.dtype for n, q in params.items() if "lora_" not in n} == {torch.bfloat16}, mode
        batch = batch_for(argparse.Namespace(batch=2, seq=8), model.config.vocab_size, "cpu")
        times, loss = _train_steps(mode, model, batch, 1, p)
        assert len(times) == 1 and math.isfinite(loss), mode
    full = build("full", "cpu", p, model_name=str(tiny_lm_dir))
    assert {q.dtype for q in full.parameters()} == {p.trained}


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--precision", "fp16-mixed"], "precision=fp16-mixed needs a CUDA device"),
        (["--precision", "fp32,fp33"], "unknown --precision ['fp33']"),
        (["--dtype", "float16"], "use --precision fp16-mixed on a CUDA device"),
        (["--dtype", "bfloat16", "--precision", "bf16"], "--dtype is the former spelling of --precision"),
    ],
)
def test_bench_bad_precision_is_one_clear_line_before_any_mode_runs(tiny_lm_dir, capsys, extra, needle):
    rc = main(["bench", "--model", str(tiny_lm_dir), "--skip-check", "--device", "cpu", "--modes", "base", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and "round 1" not in err


def test_bench_former_dtype_option_names_its_precision(capsys):
    from lorakit.tools.benchmark import resolve_precisions

    args = argparse.Namespace(dtype="bfloat16", precision=None, device="cpu")
    assert resolve_precisions(args) == ["bf16"]
    err = capsys.readouterr().err
    assert "--dtype bfloat16 means --precision bf16" in err and "precision: bf16\n" in err
    assert resolve_precisions(argparse.Namespace(dtype=None, precision="fp32,fp32", device="cpu")) == ["fp32"]
