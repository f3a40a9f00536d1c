"""train.report_to: TensorBoard, MLflow and W&B receive the metrics.jsonl records, read back by each one's own
reader; a resumed run continues the same runs; missing libraries and bad names are clear errors."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from lorakit.train.trackers import scalars
from lorakit.train.trainer import train

from .conftest import interrupt_at, torchrun_train

ALL = "train.report_to=[tensorboard, mlflow, wandb]"


def _jsonl(out: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {kind/name: {step: value}} (the last record of a step wins, as after a resume)."""
    series: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars(record).items():
            series.setdefault(tag, {})[record["step"]] = value
    return series


def _tensorboard(out: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _mlflow(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    series = {}
    for tag in run.data.metrics:
        history = sorted(client.get_metric_history(run_id, tag), key=lambda m: m.timestamp)
        series[tag] = {m.step: m.value for m in history}  # the latest value of a step wins
    return run, series, [a.path for a in client.list_artifacts(run_id, "adapter")]


def _wandb(out: Path) -> tuple[dict, dict[str, dict[int, float]]]:
    """The W&B offline run file (a LevelDB-style log of W&B's protobuf records) as (config, history)."""
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if pos % 32768 + 7 > 32768:  # a block's tail too short for a header is padding
            pos = (pos // 32768 + 1) * 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos = (pos // 32768 + 1) * 32768
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pb.Record.FromString(pending))
            pending = b""
    config, history = {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind in ("config", "run"):  # the config comes with the run record, updates in config records
            update = record.config.update if kind == "config" else record.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            step = items.pop("_step", record.history.step.num)
            for tag, value in items.items():
                if not tag.startswith("_"):
                    history.setdefault(tag, {})[step] = value
    return config, history


def _close(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for tag in want:
        assert got[tag].keys() == want[tag].keys(), tag
        for step, value in want[tag].items():
            assert got[tag][step] == pytest.approx(value, rel=rel, abs=1e-9), (tag, step)


def test_every_tracker_holds_the_metrics_jsonl_values(run_config):
    result = train(run_config(ALL, "train.max_steps=4", "train.eval_every=2", "train.batch_size=4"), progress=False)
    out = result.output_dir
    want = _jsonl(out)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "eval/loss", "eval/perplexity",
            "eval/exact_match"} <= want.keys()  # fmt: skip
    _close(_tensorboard(out), want, rel=1e-6)  # event files hold float32
    run, series, artifacts = _mlflow(out)
    _close(series, want, rel=1e-12)
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.05"
    assert run.data.params["lora.r"] == "4" and json.loads(run.data.params["lora.modules_to_save"]) == ["lm_head"]
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(artifacts)
    config, history = _wandb(out)
    _close(history, want, rel=1e-12)
    assert config["train"]["lr"] == 0.05 and config["lora"]["r"] == 4 and config["objective"] == "sft"
    # the precision auto resolved to (config.yaml says auto), beside the config; the run record logs no scalar
    chosen = json.loads((out / "status.json").read_text())["precision"]
    assert run.data.params["precision"] == "fp32" and run.data.params["resolved.precision"] == chosen
    assert config["resolved"]["precision"] == chosen and not any(tag.startswith("run/") for tag in want)


def test_a_resumed_run_continues_the_same_runs(run_config, monkeypatch):
    settings = (ALL, "train.max_steps=6", "train.save_every=2", "train.batch_size=4", "train.eval_before=false")
    restore = interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(*settings), progress=False)
    out = Path(run_config(*settings).output_dir)
    first = json.loads((out / "trackers.json").read_text())
    run, _, _ = _mlflow(out)
    assert run.info.status == "FAILED"
    restore()
    train(run_config(*settings), resume=True, progress=False)
    assert json.loads((out / "trackers.json").read_text()) == first  # the same MLflow and W&B runs
    want = _jsonl(out)
    assert sorted(want["train/loss"]) == [1, 2, 3, 4, 5, 6]
    _close(_tensorboard(out), want, rel=1e-6)  # step 3 of the first attempt purged, the resumed one kept
    run, series, _ = _mlflow(out)
    assert run.info.status == "FINISHED"
    _close(series, want, rel=1e-12)
    assert len(list((out / "wandb").glob("offline-run-*"))) >= 1
    # every W&B run directory is of the same run (W&B adds -1, -2 to a directory name already taken that second)
    names = [p.name for p in (out / "wandb").glob("offline-run-*")]
    assert names and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first['wandb_run_id']}(-\d+)?", n) for n in names)


def test_a_missing_tracker_library_names_the_extra(run_config, monkeypatch):
    import importlib

    real = importlib.import_module

    def without_mlflow(name, *args):
        if name == "mlflow":
            raise ImportError("No module named 'mlflow'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_mlflow)
    with pytest.raises(
        ValueError, match=r"includes mlflow, but the mlflow package is not installed: pip install 'lorakit\[mlflow\]'"
    ):
        train(run_config("train.report_to=[mlflow]", "train.max_steps=1"), progress=False)


@pytest.mark.parametrize("value", ["[tensorboard, comet]", "[mlflow, mlflow]"])
def test_report_to_names_are_checked(run_config, value):
    with pytest.raises(ValueError, match=r"train.report_to=.*list each of \['tensorboard', 'mlflow', 'wandb'\]"):
        run_config(f"train.report_to={value}")


def test_preference_metrics_reach_the_trackers(tiny_lm_dir, tmp_path):
    from lorakit.train.config import load_config

    from .conftest import write_jsonl
    from .test_preference import preference_rows

    write_jsonl(tmp_path / "pairs.jsonl", preference_rows(8))
    cfg = load_config(
        None,
        [f"model={tiny_lm_dir}", f"output_dir={tmp_path / 'dpo'}", f"data.train={tmp_path / 'pairs.jsonl'}",
         f"data.eval={tmp_path / 'pairs.jsonl'}", "objective=dpo", "lora.r=2", "train.max_steps=2",
         "train.batch_size=4", "train.report_to=[tensorboard]"],
    )  # fmt: skip
    out = train(cfg, progress=False).output_dir
    logged = _tensorboard(out)
    for tag in ("train/margin", "train/accuracy", "train/rewards_chosen", "eval/accuracy", "eval/prefers_chosen"):
        assert tag in logged, tag
    _close(logged, _jsonl(out), rel=1e-6)


def test_only_rank_0_logs_under_torchrun(run_config, tmp_path):
    cfg = run_config("train.report_to=[tensorboard, mlflow]", "train.max_steps=2", out="ddp").to_dict()
    torchrun_train(cfg, tmp_path)
    out = Path(cfg["output_dir"])
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    _close(_tensorboard(out), _jsonl(out), rel=1e-6)
    run, series, _ = _mlflow(out)
    assert run.info.status == "FINISHED" and series["train/loss"].keys() == {1, 2}
