"""Crash safety, full disks, unwritable paths and non-finite numbers in training (see RELIABILITY.md)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit.cli.main import main as cli_main
from lorakit.train import checkpoint as checkpoint_module
from lorakit.train import loop as loop_module
from lorakit.train import objectives
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.metrics import read_metrics
from lorakit.train.trainer import TrainingStopped, train

from .conftest import colour_rows, interrupt_at, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def _train_steps(out: Path) -> list[int]:
    if not (out / "metrics.jsonl").exists():
        return []
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("kind") == "train":
                steps.append(record["step"])
    return steps


def _driver(config: Path, kill_at: int = 0, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    cmd = [sys.executable, "-m", "tests.crash_driver", str(config), str(kill_at), str(delay)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ----- kill -9 -----------------------------------------------------------------------------------------------
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_adapter(run_config, tmp_path):
    """SIGKILL once inside a checkpoint write and three times at random moments; each resume starts from the
    newest complete checkpoint, and the final adapter equals an uninterrupted run's within 1e-6."""
    overrides = ["train.max_steps=24", "train.save_every=3", "train.keep_last=2", "train.generate_eval=false",
                 "train.eval_before=false", "lora.dropout=0.1"]  # fmt: skip
    reference = _write_config(run_config(*overrides, out="straight"), tmp_path / "straight.yaml")
    proc = _driver(reference)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    want = _adapter(tmp_path / "straight")

    config = _write_config(run_config(*overrides, out="killed"), tmp_path / "killed.yaml")
    out = tmp_path / "killed"
    # 1. killed halfway through writing checkpoint 6: the partial directory is never taken for a checkpoint
    proc = _driver(config, kill_at=6)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000003"]
    assert list((out / "checkpoints").glob(".step-0000006.tmp-*")), "the interrupted write left its temp dir"
    # 2. killed three times at random moments (between or inside steps, or inside a checkpoint write)
    rng = random.Random(1234)
    for _ in range(3):
        before = max(_train_steps(out), default=0)
        proc = _driver(config, delay=0.05)
        target = before + rng.randint(1, 4)
        deadline = time.monotonic() + 120
        while max(_train_steps(out), default=0) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.06))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read()
        for ckpt in list_checkpoints(out / "checkpoints"):  # every directory that counts is complete
            assert {p.name for p in ckpt.iterdir()} >= {"adapter_model.safetensors", "trainer_state.json"}
            json.loads((ckpt / "trainer_state.json").read_text())
    # 3. the last resume runs to the end
    proc = _driver(config)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed from" in err
    assert _max_diff(_adapter(out), want) <= 1e-6
    steps = _train_steps(out)
    assert sorted(steps) == list(range(1, 25)), steps  # each step logged once: re-run steps replaced their records
    assert not list((out / "checkpoints").glob(".*.tmp-*"))  # leftovers of killed writes are cleaned up


def test_metrics_line_cut_by_a_crash_is_dropped_on_resume(run_config):
    cfg = run_config("train.max_steps=4", "train.save_every=2", "train.generate_eval=false")
    with pytest.raises(KeyboardInterrupt), _interrupt_after(3):
        train(cfg, progress=False)
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # the process died in the middle of a record
    result = train(cfg, resume=True, progress=False)
    assert result.steps == 4
    assert _train_steps(Path(cfg.output_dir)) == [1, 2, 3, 4]


@contextlib.contextmanager
def _interrupt_after(step: int):
    original = loop_module.Loop._periodic

    def periodic(self, eval_rows):
        original(self, eval_rows)
        if self.step == step:
            raise KeyboardInterrupt

    loop_module.Loop._periodic = periodic
    try:
        yield
    finally:
        loop_module.Loop._periodic = original


# ----- disks and paths ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False):
    """A size-limited (or read-only) tmpfs at ``path``; skips the test where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_full_disk_stops_with_a_clear_error_and_keeps_earlier_checkpoints(run_config, tmp_path):
    """A tmpfs with room for one checkpoint: the second write fails with ENOSPC; the first stays whole and
    the run resumes from it once there is space, ending with the uninterrupted run's adapter."""
    overrides = ["train.max_steps=6", "train.save_every=2", "train.keep_last=5", "train.generate_eval=false"]
    straight = train(run_config(*overrides, out="straight"), progress=False)
    one_checkpoint = _dir_bytes(straight.output_dir / "checkpoints" / "step-0000002")
    disk = tmp_path / "disk"
    size_kb = (one_checkpoint * 3 // 2 + 64 * 1024) // 1024
    with _tmpfs(disk, f"{size_kb}k"):
        cfg = run_config(*overrides, out="disk/run")
        with pytest.raises(OSError, match=r"could not write checkpoint step-0000004 .*No space left on device") as err:
            train(cfg, progress=False)
        assert err.value.errno == errno.ENOSPC
        assert "The earlier checkpoints are intact (step-0000002)" in str(err.value)
        ckpts = list_checkpoints(disk / "run" / "checkpoints")
        assert [p.name for p in ckpts] == ["step-0000002"]
        assert not list((disk / "run" / "checkpoints").glob(".*.tmp-*"))
        saved = straight.output_dir / "checkpoints" / "step-0000002"
        assert _max_diff(_adapter(ckpts[0]), _adapter(saved)) == 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        train(cfg, resume=True, progress=False)
        assert _max_diff(_adapter(disk / "run"), _adapter(straight.output_dir)) <= 1e-6


def test_write_error_in_a_checkpoint_keeps_earlier_ones(run_config, monkeypatch, capsys):
    """The same as the full-disk test without root: the write itself reports ENOSPC."""
    real = checkpoint_module.write_safetensors
    calls = {"n": 0}

    def failing(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint_module, "write_safetensors", failing)
    cfg = run_config("train.max_steps=6", "train.save_every=2", "train.generate_eval=false")
    config_path = _write_config(cfg, Path(cfg.output_dir).parent / "run.yaml")
    code = cli_main(["train", str(config_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("lorakit train: error: ") and "could not write checkpoint step-0000004" in line
    assert "earlier checkpoints are intact (step-0000002)" in line and "--resume" in line
    ckpts = list_checkpoints(Path(cfg.output_dir) / "checkpoints")
    assert [p.name for p in ckpts] == ["step-0000002"]
    _adapter(ckpts[0])  # loads: complete and uncorrupted


def test_unwritable_output_dir_is_a_clear_error(run_config, tmp_path, capsys):
    target = tmp_path / "locked"
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only mount instead
        context = _tmpfs(target, "1m", read_only=True)
    else:
        target.mkdir()
        target.chmod(0o500)
        context = contextlib.nullcontext(target)
    with context:
        cfg = run_config(out="locked/run")
        with pytest.raises(ValueError, match=r"output_dir .*locked/run is not writable \(.*\); choose a directory"):
            train(cfg, progress=False)
        config_path = _write_config(cfg, tmp_path / "run.yaml")
        assert cli_main(["train", str(config_path), "--no-progress"]) == 2
        assert "is not writable" in capsys.readouterr().err


def test_existing_run_needs_overwrite_and_keeps_its_files(run_config, capsys):
    cfg = run_config("train.max_steps=2", "train.save_every=1", "train.generate_eval=false")
    train(cfg, progress=False)
    out = Path(cfg.output_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    config_path = _write_config(cfg, out.parent / "again.yaml")
    assert cli_main(["train", str(config_path), "--no-progress"]) == 2
    assert "already holds a run; pass --resume to continue it, --overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_refuses_a_finished_run_and_keeps_its_files(run_config, capsys):
    cfg = run_config("train.max_steps=2", "train.generate_eval=false")
    train(cfg, progress=False)
    out = Path(cfg.output_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    config_path = _write_config(cfg, out.parent / "again.yaml")
    assert cli_main(["train", str(config_path), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--overwrite" in err and "train.max_steps" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_refuses_a_config_with_other_data_targets_or_method(run_config, tmp_path, monkeypatch, capsys):
    restore = interrupt_at(monkeypatch, 3)
    cfg = run_config("train.generate_eval=false")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    restore()
    out = Path(cfg.output_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_jsonl(tmp_path / "other.jsonl", colour_rows(16, seed=5))
    for change, named in [
        (f"data.train={tmp_path / 'other.jsonl'}", "data.train"),
        ("lora.target_modules=[q_proj]", "lora.target_modules"),
        ("lora.use_dora=true", "lora.use_dora"),
        ("objective=orpo", "objective"),
    ]:
        with pytest.raises(ValueError, match=f"--resume: this config differs from the run .* in {named}: "):
            train(run_config("train.generate_eval=false", change), resume=True, progress=False)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # steps, learning rate and the like may change: named, then the run continues
    train(run_config("train.generate_eval=false", "train.max_steps=14"), resume=True, progress=True)
    assert "resuming with train.max_steps changed: 12 -> 14" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, 15))


def test_resume_without_a_checkpoint_starts_over_without_doubling_the_metrics(run_config, monkeypatch):
    cfg = run_config("train.generate_eval=false")
    restore = interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    restore()
    out = Path(cfg.output_dir)
    shutil.rmtree(out / "checkpoints")  # as a kill -9 before the first checkpoint leaves it
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] != "run"] == [0, 1, 2]
    train(cfg, resume=True, progress=False)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 12]
    assert [r["step"] for r in records if r["kind"] == "run"] == [0]  # the restart's own record only


# ----- non-finite numbers ------------------------------------------------------------------------------------
class _InfiniteGradient(torch.autograd.Function):
    """Identity forward; backward sends an infinite gradient: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _poison_gradient_at(monkeypatch, call: int) -> None:
    real = objectives.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, task):
        calls["n"] += 1
        loss, n = real(model, batch, task)
        return (_InfiniteGradient.apply(loss) if calls["n"] == call else loss), n

    monkeypatch.setattr(objectives, "token_loss_sum", poisoned)


def test_infinite_gradient_stops_the_run_and_keeps_the_last_good_checkpoint(run_config, monkeypatch):
    _poison_gradient_at(monkeypatch, 5)
    cfg = run_config("train.save_every=2", "train.keep_last=5", "train.generate_eval=false")
    with pytest.raises(TrainingStopped, match=r"the gradient norm became (inf|nan) at step 5.*step-0000004"):
        train(cfg, progress=False)
    ckpts = list_checkpoints(Path(cfg.output_dir) / "checkpoints")
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004"]
    for tensor in _adapter(ckpts[-1]).values():
        assert torch.isfinite(tensor).all()


def test_infinite_gradient_is_skipped_and_counted_with_nan_policy_skip(run_config, monkeypatch, capsys):
    _poison_gradient_at(monkeypatch, 3)
    cfg = run_config("train.nan_policy=skip", "train.max_steps=6", "train.generate_eval=false")
    result = train(cfg, progress=False)
    assert result.skipped_steps == 1 and result.steps == 6
    assert "step 3: the gradient norm is" in capsys.readouterr().err
    for tensor in _adapter(Path(cfg.output_dir)).values():
        assert torch.isfinite(tensor).all()
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    step3 = next(r for r in records if r.get("kind") == "train" and r["step"] == 3)
    assert step3["grad_norm"] is None and all(r.get("grad_norm") is not None for r in records if r.get("step") == 4)
