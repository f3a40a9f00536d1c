"""Run metrics: one JSON object per line in metrics.jsonl, and a PNG of the loss and eval curves.

Records by ``kind``: ``run`` (at the start and at each resume: the resolved precision and its reason), ``train``
(one per step) and ``eval``; readers select the kinds they show and skip the others."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from .. import durable

STATUS_FILE = "status.json"
STATES = ("running", "finished", "failed", "interrupted")


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (flushed and synced per record, so a crash loses nothing written)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.trackers = None  # lorakit.train.trackers.Trackers: the same records to TensorBoard, MLflow, W&B

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # Append-only, not swapped in (``durable`` would rewrite the whole log per step): flushed and synced per
        # record; a line a crash cuts short is the last one, and readers drop it (``_lines``).
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.trackers is not None:
            self.trackers.log(record)

    def truncate_after(self, step: int) -> None:
        """Drop records beyond ``step`` (a resumed run rewrites them)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in _lines(self.path) if json.loads(line).get("step", 0) <= step]
        durable.write_text(self.path, "".join(line + "\n" for line in kept))


class RunStatus:
    """``status.json`` of a run: running (with the process id and host), then finished, failed (with the error)
    or interrupted. Written atomically and durably (``durable.write_text``) by the main process, so a reader (``lorakit ui``) never sees half a file;
    a run whose file still says running but whose process is gone was killed."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.path = out / STATUS_FILE
        self.enabled = enabled
        self.started = time.time()
        self.max_steps: int | None = None  # the run's length, once known (train.epochs: after the data is read)
        self.precision: str | None = None  # the resolved precision (config.yaml may say auto) and why it was chosen
        self.precision_reason: str | None = None

    def set(self, state: str, step: int | None = None, error: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                  "updated": time.time(), "step": step, "max_steps": self.max_steps, "precision": self.precision,
                  "precision_reason": self.precision_reason, "error": error}  # fmt: skip
        durable.write_text(self.path, json.dumps(record) + "\n")


def read_status(out: Path) -> dict[str, Any] | None:
    """The run's ``status.json``, or None when there is none (a run from before it existed) or it is unreadable."""
    try:
        record = json.loads((out / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("state") in STATES else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(path)]


def _lines(path: Path) -> list[str]:
    """The complete JSON records of ``path``; a line cut short by a crash (the last one) is dropped."""
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            json.loads(line)
        except ValueError:
            continue
        lines.append(line)
    return lines


def plot_metrics(records: list[dict[str, Any]], out: Path) -> Path:
    """Training loss, eval loss and accuracy (exact match; for preference tuning the reward accuracy of the
    steps and the evaluations) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and math.isfinite(r["loss"])]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over pairs)" if any("accuracy" in r for r in records) else "loss (nats / token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    preference = any("accuracy" in r for r in records)
    key, name = ("accuracy", "reward accuracy") if preference else ("exact_match", "exact match")
    series = [("s--", "tab:green", f"eval {name} %", evals)]
    if preference:
        series.append(("-", "tab:olive", f"train {name} %", [r for r in records if r.get("kind") == "train"]))
    ax2 = None
    for style, colour, label, rows in series:
        points = [(r["step"], 100 * r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax2 = ax2 or ax.twinx()
            ax2.plot(*zip(*points, strict=True), style, color=colour, label=label, linewidth=1)
    if ax2 is not None:
        ax2.set_ylabel(f"{name} (%)")
        ax2.set_ylim(0, 102)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    retention = [r for r in records if r.get("kind") == "retention" and r.get("kept_share") is not None]
    title = "lorakit training"
    if retention:  # train.eval_retention: what the trained model kept of the base's general behaviour
        r = retention[-1]
        title += f"  |  retention {100 * r['kept_share']:.1f} % of probes kept, KL {r['kl']:.3g} nats/token"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
