"""`lorakit bench`: runs each mode in a child process and reports a table; bad input is a clear error."""

from __future__ import annotations

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
