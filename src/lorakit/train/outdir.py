"""A run's output directory: what it holds, and whether a new command may write into it or continue it.

A directory with a run in it is never replaced by accident: a fresh run needs ``--overwrite``; ``--resume``
continues an interrupted run only, and only with the config it was started with where it matters (the model,
the data, the method and its adapter's shape). Settings that only steer the rest of the run (steps, learning
rate, evaluation and checkpoint intervals) may change on resume and are named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig
from .metrics import read_status

RUN_FILES = ("adapter_config.json", "metrics.jsonl")  # the marks of a run that started training
# Keys a resumed run must share with the run it continues: a checkpoint holds an adapter of that model, method
# and shape, trained on that data.
DEFINING = ("model", "objective", "task", "quantize", "data.train", "data.eval", "data.eval_fraction",
            "data.max_length", "data.completion_only", "data.packing", "data.packing_strategy", "lora",
            "dpo.reference_adapter")  # fmt: skip
PATH_KEYS = ("model", "data.train", "data.eval", "dpo.reference_adapter", "output_dir")
IGNORED = ("overwrite",)  # how this command treats the directory, not a setting of the run


def check_output_dir(out: Path, cfg: RunConfig, resume: bool) -> list[str]:
    """Refuse what would lose or mix up a saved run; returns notes to print (keys a resume changes)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file; choose a directory")
    holds_run = any((out / name).exists() for name in RUN_FILES)
    if not resume:
        if holds_run and not cfg.overwrite:
            raise ValueError(
                f"output_dir {out} already holds a run; pass --resume to continue it, --overwrite (or "
                "--set overwrite=true) to replace it, or choose another output_dir"
            )
        return []
    if holds_run and is_finished(out):
        raise ValueError(
            f"output_dir {out} holds a finished run (its adapter is written): --resume continues an interrupted "
            "run only. To train further, start a new run with the train.max_steps you want in another output_dir, "
            "or rerun without --resume and with --overwrite to replace this one"
        )
    saved = _saved_config(out)
    return _compare(out, saved, cfg.to_dict()) if saved is not None else []


def is_finished(out: Path) -> bool:
    """Whether the run in ``out`` ended normally: its status says so, or (a run from before status files) its
    final adapter is there."""
    status = read_status(out)
    if status is not None:
        return status["state"] == "finished"
    return (out / "adapter_config.json").exists()


def _saved_config(out: Path) -> dict[str, Any] | None:
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def _compare(out: Path, saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Refuse a resume whose defining keys differ from the run's; name the other keys that differ."""
    old, new = _flat(saved), _flat(now)
    changed = [k for k in new if k in old and k not in IGNORED and not _same(k, old[k], new[k])]
    defining = [k for k in changed if any(k == d or k.startswith(d + ".") for d in DEFINING)]
    if defining:
        listed = "; ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in defining)
        raise ValueError(
            f"--resume: this config differs from the run in {out} ({out / 'config.yaml'}) in {listed}. A "
            "checkpoint continues the run that wrote it: resume with that run's config (lorakit train "
            f"{out / 'config.yaml'} --resume), or start a new run in another output_dir"
        )
    return [f"resuming with {k} changed: {old[k]!r} -> {new[k]!r}" for k in changed]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in ("data", "lora", "train", "dpo", "compare"):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _same(key: str, a: Any, b: Any) -> bool:
    """Equal values; paths compare by the file they name (a relative path read from the working directory)."""
    if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and a != b:
        return os.path.abspath(a) == os.path.abspath(b)
    return a == b
