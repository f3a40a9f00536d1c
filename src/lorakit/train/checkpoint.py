"""Checkpoints without pickles: tensors in safetensors, everything else in JSON, written atomically."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .. import durable
from ..io import write_safetensors

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` lives under ``root``."""
    return root / f"step-{step:07d}"


def save_checkpoint(
    root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, method, extra: dict[str, Any]
) -> Path:
    """Write checkpoint ``step`` under ``root`` and return its path. ``extra``: the loop's JSON state (skipped
    steps, the precision, fp16-mixed's loss scaler), returned by ``load_checkpoint`` with the rest.

    Everything goes into a temporary directory that is synced and then swapped into place
    (``durable.replace_dir``), so a ``step-N`` directory is always complete: a crash or a full disk leaves at
    most a ``.step-N.tmp-PID`` directory, which loading ignores and the next save removes. The same step saved
    again replaces the old ``step-N`` only once the new one is in place. Earlier checkpoints are never touched.

    Raises:
        OSError: the write failed (full disk, no permission); the message says what and where, and
            that the earlier checkpoints are intact.
    """
    final = step_dir(root, step)
    try:
        with durable.replace_dir(final) as tmp:
            method.save(model, tmp)  # for LoRA: an ordinary adapter directory, usable on its own
            tensors, meta = _optimizer_state(optimizer)
            tensors.update(rng_tensors())
            state = {
                "step": step,
                "optimizer": meta,
                "scheduler": scheduler.state_dict(),
                "python_random": jsonable(random.getstate()),
                **extra,
            }
            write_safetensors(tensors, tmp / STATE_TENSORS)
            (tmp / STATE_JSON).write_text(json.dumps(state))  # synced with the directory by replace_dir
    except OSError as err:
        kept = [p.name for p in list_checkpoints(root)]
        raise OSError(
            err.errno,
            f"could not write checkpoint {final.name} in {root}: {err.strerror or err}. "
            + (f"The earlier checkpoints are intact ({', '.join(kept)}); " if kept else "No checkpoint was saved; ")
            + "free space or fix the permissions, then continue with --resume",
        ) from err
    return final


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, for JSON (``tupled`` undoes it)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return [jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def tupled(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: tupled(v) for k, v in value.items()}
    return tuple(tupled(v) for v in value) if isinstance(value, list) else value


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, method
) -> dict[str, Any]:
    """Restore the trained weights (through ``method``), optimizer, scheduler and RNG states; return the JSON state."""
    try:
        method.restore(model, path)
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"checkpoint {path} does not match this run ({err}); start a new run in another output_dir"
        ) from None
    state = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    optimizer_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    for index, scalars in state["optimizer"]["scalars"].items():
        optimizer_state.setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["optimizer"]["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(tensors)
    random.setstate(tupled(state["python_random"]))
    return state


def rng_tensors(devices: list[int] | None = None) -> dict[str, torch.Tensor]:
    """torch's random states as tensors: the CPU generator's, and where CUDA is in use each GPU's (``devices``:
    which; default all), so that dropout continues exactly on resume on a GPU too."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()) if devices is None else devices:
            tensors[f"rng.cuda.{index}"] = torch.cuda.get_rng_state(index)
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Restore what ``rng_tensors`` saved; a GPU's state only where that GPU exists (a checkpoint written on a
    GPU resumes on a CPU with its CPU state)."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key, value in tensors.items():
        if key.startswith("rng.cuda.") and int(key.rsplit(".", 1)[1]) < cuda:
            torch.cuda.set_rng_state(value, int(key.rsplit(".", 1)[1]))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are ignored). A checkpoint that a
    crash left renamed aside, in the middle of being replaced, is put back first (``durable.recover``)."""
    if not root.is_dir():
        return []
    durable.recover(root, clean=False)
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (each at once: renamed aside, then removed), and what crashed
    saves left: the run owns ``root``, so every leftover there is stale."""
    for old in list_checkpoints(root)[:-keep]:
        durable.delete(old)
    durable.recover(root, owner=True)
