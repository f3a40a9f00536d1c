"""SIGTERM and SIGINT stop a training run at a step boundary with a checkpoint, in one process and under
torchrun; a run whose SIGINT was ignored by its shell still stops on SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit.train import signals
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.trainer import train

from .conftest import torchrun_train

ROOT = Path(__file__).resolve().parents[1]
# A `lorakit train` process whose steps each take a while, so that a test can signal it mid-run. Arguments:
# the config file, the seconds each step sleeps, whether the process starts with SIGINT ignored (as a shell
# starts a background job).
DRIVER = """
import signal, sys, time
from lorakit.cli.main import main
from lorakit.train import loop
config, delay, ignore_int = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
if ignore_int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
real = loop.Loop._step
def slow(self, indices):
    time.sleep(delay)
    return real(self, indices)
loop.Loop._step = slow
sys.exit(main(["train", config, "--no-progress", "--resume"]))
"""


def _train_records(out: Path) -> list[dict]:
    if not (out / "metrics.jsonl").exists():
        return []
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == "train"]


def _start(cfg, tmp_path: Path, delay: float, ignore_int: bool = False) -> subprocess.Popen:
    path = tmp_path / f"{Path(cfg.output_dir).name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", DRIVER, str(path), str(delay), "1" if ignore_int else "0"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(out: Path, steps: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(_train_records(out)) < steps:
        assert process.poll() is None, process.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "the run did not reach its steps in time"
        time.sleep(0.05)


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("signum", "ignore_int", "code"),
    [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)],
    ids=["sigterm", "sigint-ignored-by-the-shell"],
)
def test_a_signal_checkpoints_at_a_step_boundary_and_resume_is_exact(run_config, tmp_path, signum, ignore_int, code):
    straight = train(run_config("train.eval_before=false", out="straight"), progress=False)
    cfg = run_config("train.eval_before=false", out="signalled")
    out = Path(cfg.output_dir)
    process = _start(cfg, tmp_path, delay=0.3, ignore_int=ignore_int)
    _wait_for_steps(out, 3, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-4000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted"
    assert status["error"] == f"stopped by {signal.Signals(signum).name}"
    done = len(_train_records(out))
    assert 3 <= done < 12
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{done:07d}"]
    assert f"interrupted by {signal.Signals(signum).name} after step {done}" in stderr
    assert not (out / "adapter_model.safetensors").exists()

    train(cfg, resume=True, progress=False)
    want, got = _adapter(straight.output_dir), _adapter(out)
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    assert [r["step"] for r in _train_records(out)] == list(range(1, 13))


def test_a_second_signal_stops_at_once():
    requests = signals.StopRequests()
    with requests.deferred():
        requests.handle(signal.SIGTERM, None)  # the first waits for the step's end
        assert requests.pending
        with pytest.raises(signals.Interrupted) as caught:
            requests.handle(signal.SIGINT, None)
    assert caught.value.exit_code == 130
    with pytest.raises(signals.Interrupted) as caught:
        requests.stop()
    assert caught.value.exit_code == 143


def test_processes_agree_on_the_stop_and_name_sigterm_first():
    requests = signals.StopRequests()
    assert requests.as_counts() == [0.0, 0.0]
    requests.agree([0.0, 0.0])
    assert requests.agreed is None
    requests.agree([1.0, 1.0])  # one process got SIGINT, another SIGTERM
    assert requests.agreed == signal.SIGTERM
    with pytest.raises(signals.Interrupted) as caught:
        requests.stop()  # this process received nothing: it stops with the others
    assert caught.value.signum == signal.SIGTERM


def test_handlers_are_restored_after_the_run():
    before = {s: signal.getsignal(s) for s in signals.HANDLED}
    with signals.installed() as requests:
        assert all(signal.getsignal(s) == requests.handle for s in signals.HANDLED)
    assert {s: signal.getsignal(s) for s in signals.HANDLED} == before


def _workers(pid: int) -> list[int]:
    """The child processes of ``pid`` (torchrun's workers)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


@pytest.mark.parametrize("target", ["torchrun", "one-worker"])
def test_sigterm_under_torchrun_stops_every_process_after_the_same_step(run_config, tmp_path, target):
    """SIGTERM to torchrun (which passes it on to every worker), or to one worker only: every process stops
    after the same step (the stop travels with the step's all-reduce), rank 0 writes the checkpoint of that
    step, the status says interrupted, and the run resumes."""
    cfg = run_config("train.eval_before=false", "train.max_steps=100000", "train.scheduler=constant",
                     "data.eval=null", out=target).to_dict()  # fmt: skip
    cfg["train"]["batch_size"] = 4
    out = Path(cfg["output_dir"])
    process = torchrun_train(cfg, tmp_path, wait=False)
    deadline = time.monotonic() + 300
    while len(_train_records(out)) < 3:
        assert process.poll() is None, process.communicate()[1][-6000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    if target == "torchrun":
        process.send_signal(signal.SIGTERM)
    else:
        os.kill(_workers(process.pid)[-1], signal.SIGTERM)  # not rank 0's process, as likely as not
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "interrupted", stderr[-6000:]
    done = len(_train_records(out))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{done:07d}"], stderr[-6000:]
    assert stderr.count("lorakit train: interrupted (SIGTERM)") == 2, stderr[-6000:]  # each process, no crash
    cfg["train"]["max_steps"] = done + 2
    torchrun_train(cfg, tmp_path, "--resume")
    assert [r["step"] for r in _train_records(out)] == list(range(1, done + 3))
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
