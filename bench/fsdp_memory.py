"""Per-process memory and step time of sharded (FSDP) against replicated (DDP) training, on the embedded model.

    .venv/bin/python bench/fsdp_memory.py [--steps 6] [--model default] [--gradient-checkpointing]

Runs `lorakit train` on the dates task (examples/data, from `make demo` or examples/make_dates.py) under
torchrun in three set-ups, one after the other: one process; two processes with `train.strategy: ddp`; two with
`train.strategy: fsdp`. Each process reports the bytes of the parameters it holds (its shards under FSDP), its
peak resident memory (`ru_maxrss`: the model as loaded, the optimizer state, activations) and the median step
time after the first step. Two processes on this 2-core machine share the cores: the step times say what
sharding costs in communication, not what a second machine would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = (("one process", "ddp", 1), ("DDP", "ddp", 2), ("FSDP", "fsdp", 2))


def _worker(config: str, report: str) -> None:
    import torch

    from lorakit.train import trainer
    from lorakit.train.config import load_config
    from lorakit.train.fsdp import local_parameter_bytes

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    loaded = {}
    setup_method = trainer.setup_method

    def measured_setup(*args, **kwargs):  # the peak once the model is loaded (and sharded), before any step
        result = setup_method(*args, **kwargs)
        loaded["peak"] = _peak_rss()
        return result

    trainer.setup_method = measured_setup
    result = trainer.train(load_config(config), progress=False)
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "rank": rank,
        "parameter_bytes": local_parameter_bytes(result.model),
        "peak_after_load_bytes": loaded["peak"],
        "peak_rss_bytes": _peak_rss(),
    }
    Path(f"{report}.rank{rank}.json").write_text(json.dumps(record))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(name: str, strategy: str, processes: int, args, tmp: Path) -> dict:
    import yaml

    out = tmp / name.replace(" ", "-")
    config = {
        "model": args.model, "output_dir": str(out), "seed": 0,
        "data": {"train": str(ROOT / "examples/data/dates-train.jsonl"), "max_length": 64},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "train": {"max_steps": args.steps, "batch_size": 8, "lr": 2e-3, "strategy": strategy, "eval_before": False,
                  "gradient_checkpointing": args.gradient_checkpointing},
    }  # fmt: skip
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = max(1, (os.cpu_count() or 2) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(_port()), __file__, "--worker", str(path), str(tmp / out.name)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads((tmp / f"{out.name}.rank{r}.json").read_text()) for r in range(processes)]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in steps if r.get("kind") == "train"][1:]
    return {"name": name, "processes": processes, "ranks": ranks, "step_seconds": statistics.median(seconds)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
        sys.stdout.flush()
        os._exit(0)  # no interpreter shutdown under torchrun: see lorakit.cli.main._exit_now
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="fewer activations: the weights' share shows"
    )
    args = parser.parse_args()
    if not (ROOT / "examples/data/dates-train.jsonl").is_file():
        raise SystemExit("generate the data first: python examples/make_dates.py --out examples/data")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from lorakit.fastpath import cpu_description

    with tempfile.TemporaryDirectory() as tmp:
        results = [_run(name, strategy, n, args, Path(tmp)) for name, strategy, n in SETUPS]
    checkpointing = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(f"\nLoRA r=16 on all linear layers of {args.model}, batch 8, {args.steps} steps{checkpointing}; machine: "
          f"{cpu_description()}, torch {torch.__version__}\n")  # fmt: skip
    print("| set-up | rank | parameters held (MB) | peak RSS after loading (MB) | peak RSS, whole run (MB) | "
          "median step (s) |\n|---|---|---|---|---|---|")  # fmt: skip
    for result in results:
        for rank in result["ranks"]:
            print(
                f"| {result['name']} ({result['processes']} proc.) | {rank['rank']} | "
                f"{rank['parameter_bytes'] / 1e6:.1f} | {rank['peak_after_load_bytes'] / 1e6:.0f} | "
                f"{rank['peak_rss_bytes'] / 1e6:.0f} | {result['step_seconds']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
