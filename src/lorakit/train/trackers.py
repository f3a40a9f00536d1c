"""Experiment trackers: every metrics.jsonl record also goes to TensorBoard, MLflow and / or W&B.

``train.report_to`` names them; each is its own optional library (``pip install 'lorakit[tensorboard]'``,
``[mlflow]``, ``[wandb]``), imported only when named. A record ``{"kind": K, "step": S, name: value, ...}``
becomes the scalar ``K/name`` at step S for every finite number in it (train/loss, train/lr,
train/grad_norm, eval/loss, eval/exact_match, the DPO / ORPO metrics, ...); a record without one (the ``run``
record of the precision) logs nothing. The precision ``auto`` resolved to goes with the config, as
``resolved.precision`` and ``resolved.reason``.

- TensorBoard: event files in ``output_dir/tensorboard/`` (``tensorboard --logdir output_dir/tensorboard``).
- MLflow: a run in ``train.tracking_uri`` (default: a local SQLite store, ``output_dir/mlflow.db``, with the
  artifacts in ``output_dir/mlartifacts``), experiment ``train.project``; the resolved config as params, the metrics per step, the adapter files as artifacts.
- W&B: project ``train.project``, offline (files under ``output_dir/wandb``) unless ``WANDB_MODE`` says
  otherwise; the resolved config and the metrics per step.

A resumed run continues the same runs: the MLflow and W&B run ids are kept in ``output_dir/trackers.json``,
and TensorBoard's writer purges the events after the checkpoint's step. Only rank 0 logs.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from .. import durable

STATE = "trackers.json"
ARTIFACTS = ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "loss.png")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers as ``kind/name`` scalars (kind and step themselves excluded)."""
    kind = record.get("kind", "train")
    out = {}
    for name, value in record.items():
        if name in ("kind", "step") or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[f"{kind}/{name}"] = float(value)
    return out


def _require(module: str, reporter: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"train.report_to includes {reporter}, but the {reporter} package is not installed: "
            f"pip install 'lorakit[{reporter}]' (or remove {reporter} from train.report_to)"
        ) from None


class _TensorBoard:
    def __init__(self, out: Path, start_step: int) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events a crashed run wrote after its last checkpoint
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def finish(self, out: Path, failed: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, out: Path, cfg, state: dict, params: dict[str, str]) -> None:
        mlflow = _require("mlflow", "mlflow")
        self.mlflow = mlflow
        if cfg.train.tracking_uri:
            mlflow.set_tracking_uri(cfg.train.tracking_uri)
        else:  # a store of this run's own, artifacts beside it (MLflow's default would be the working directory)
            mlflow.set_tracking_uri(f"sqlite:///{(out / 'mlflow.db').resolve()}")
            if mlflow.get_experiment_by_name(cfg.train.project) is None:
                location = (out / "mlartifacts").resolve().as_uri()
                mlflow.create_experiment(cfg.train.project, artifact_location=location)
        mlflow.set_experiment(cfg.train.project)
        run_id = state.get("mlflow_run_id")
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else out.name)
        state["mlflow_run_id"] = self.run.info.run_id
        if not run_id:  # params are fixed once set: a resumed run keeps the first ones
            mlflow.log_params(params)

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def finish(self, out: Path, failed: bool) -> None:
        if not failed:
            for name in ARTIFACTS:
                if (out / name).is_file():
                    self.mlflow.log_artifact(str(out / name), artifact_path="adapter")
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class _WandB:
    def __init__(self, out: Path, cfg, state: dict, config: dict) -> None:
        wandb = _require("wandb", "wandb")
        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE", "offline")  # nothing leaves the machine unless asked
        run_id = state.get("wandb_run_id") or secrets.token_hex(4)
        self.run = wandb.init(
            project=cfg.train.project, dir=str(out), id=run_id, resume="allow", mode=mode, config=config,
            name=out.name, settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip
        state["wandb_run_id"] = run_id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, out: Path, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The trackers ``train.report_to`` names, fed every metrics record (rank 0 only)."""

    def __init__(self, backends: list) -> None:
        self.backends = backends

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            for backend in self.backends:
                backend.log(values, int(record.get("step", 0)))

    def finish(self, out: Path, failed: bool = False) -> None:
        for backend in self.backends:
            backend.finish(out, failed)
        self.backends = []


def open_trackers(cfg, out: Path, start_step: int, enabled: bool, resolved: dict[str, Any] | None = None) -> Trackers:
    """The trackers of ``cfg.train.report_to``; a resumed run (``start_step`` > 0) continues the same runs.
    ``resolved``: what the run decided that the config leaves open (the precision ``auto`` chose, and why),
    recorded beside the config under ``resolved``."""
    names = list(cfg.train.report_to)
    if not enabled or not names:
        return Trackers([])
    path = out / STATE
    state = json.loads(path.read_text()) if start_step and path.is_file() else {}
    config = cfg.to_dict() | ({"resolved": resolved} if resolved else {})
    params = {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in _flatten(config).items()}
    backends = []
    for name in names:
        if name == "tensorboard":
            backends.append(_TensorBoard(out, start_step))
        elif name == "mlflow":
            backends.append(_MLflow(out, cfg, state, params))
        else:
            backends.append(_WandB(out, cfg, state, config))
    durable.write_text(path, json.dumps(state, indent=2))
    return Trackers(backends)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
