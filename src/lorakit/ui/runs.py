"""The dashboard's workspace: the run directories under ``--runs``, their state, and the runs it launches.

Every path a client names is confined: run names are relative paths of plain name parts (no ``..``, no
absolute paths), and every path is resolved, symlinks followed, and refused unless it lies inside the runs
directory (or, for data, the data directory). A run's state comes from its ``status.json`` (written by the
trainer), from the process when this dashboard launched it, and from the files for runs older than the
status file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from .. import durable
from ..serve.registry import NAME_RE as NAME_PART  # a run name's parts follow the adapter name rule
from ..train.checkpoint import list_checkpoints
from ..train.metrics import read_metrics, read_status

RUN_MARKERS = ("status.json", "metrics.jsonl", "adapter_config.json", "config.yaml", "launch.yaml")
COMPARE_MARKERS = ("compare-config.yaml", "results.json")
SKIP_DIRS = {"checkpoints", "tensorboard", "mlartifacts", "wandb", "__pycache__"}
LOG_FILE = "train.log"
LAUNCH_FILE = "launch.yaml"


class PathRefused(ValueError):
    """A path that leads outside the directories the dashboard may touch (HTTP 403)."""


class NotFound(ValueError):
    """No such run (HTTP 404)."""


class Conflict(ValueError):
    """The run is in a state that forbids the operation (HTTP 409)."""


def confine(value: str, base: Path, allowed: list[Path], what: str) -> Path:
    """``value`` (relative to ``base``, or absolute) resolved, if it lies inside one of ``allowed``."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise PathRefused(f"{what} {value!r} is not a path; give a path inside {allowed[0]}")
    pure = PurePosixPath(value.replace("\\", "/"))
    if ".." in pure.parts:
        raise PathRefused(f"{what} {value!r}: '..' is not allowed; give a path inside {allowed[0]}")
    resolved = (base / Path(value)).resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        where = " or ".join(str(r) for r in allowed)
        raise PathRefused(f"{what} {value!r} leads outside {where} (symlinks are followed); use a path inside it")
    return resolved


def pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_lorakit_process(pid: int) -> bool:
    """Whether ``pid`` runs lorakit (guards the stop button against a recycled process id)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\x00", b" ")
    except OSError:
        return False
    return b"lorakit" in cmdline


@dataclass
class Launched:
    """A training process this dashboard started."""

    process: subprocess.Popen
    log: Any
    started: float = field(default_factory=time.time)


class Workspace:
    """The runs directory (and the data directory) and the training processes launched into it."""

    def __init__(self, runs: str | os.PathLike, data: str | os.PathLike | None = None) -> None:
        self.root = Path(runs).resolve()
        self.data_dir = Path(data).resolve() if data is not None else self.root / "data"
        if not self.root.is_dir():
            raise ValueError(f"--runs {runs} is not a directory; create it or point --runs at one")
        durable.recover(self.root, kinds=("del",))  # what deletes cut short by a crash left
        self.launched: dict[str, Launched] = {}
        self._lock = threading.Lock()
        self._parsed: dict[Path, tuple[tuple[int, int], Any]] = {}

    # ----- paths ----------------------------------------------------------------------------------------------
    @property
    def data_roots(self) -> list[Path]:
        return [self.root] if self.data_dir.is_relative_to(self.root) else [self.root, self.data_dir]

    def check_name(self, name: str) -> str:
        """A run name: a relative path of 1-4 parts of letters, digits, '.', '_', '-'."""
        parts = name.split("/") if isinstance(name, str) else []
        if not parts or len(parts) > 4 or not all(NAME_PART.match(p) for p in parts):
            raise PathRefused(
                f"invalid run name {name!r}: use letters, digits, '.', '_' or '-' (up to 64 per part, parts "
                "separated by '/'), starting with a letter or digit; no '..' or absolute paths"
            )
        return name

    def run_dir(self, name: str, must_exist: bool = True) -> Path:
        path = confine(self.check_name(name), self.root, [self.root], "run")
        if path == self.root:
            raise PathRefused(f"run {name!r} is the runs directory itself; name a run inside it")
        if must_exist and not path.is_dir():
            raise NotFound(f"no run named {name!r} in {self.root}")
        return path

    def data_path(self, value: str, what: str) -> Path:
        return confine(value, self.root, self.data_roots, what)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def data_files(self) -> list[str]:
        """Data files (.jsonl, .json, .csv, .parquet) and saved datasets in the data directory: relative to the runs
        directory when inside it (as a run's config names them), else absolute."""
        found: list[Path] = []
        if self.data_dir.is_dir():
            for dirpath, dirnames, filenames in os.walk(self.data_dir):
                here = Path(dirpath)
                dirnames[:] = sorted(d for d in dirnames if not (here / d).is_symlink() and d not in SKIP_DIRS)
                if (here / "dataset_info.json").is_file() or (here / "state.json").is_file():
                    found.append(here)  # a dataset saved by Hugging Face `datasets`
                    dirnames[:] = []
                    continue
                for f in sorted(filenames):
                    if f.endswith((".jsonl", ".json", ".csv", ".parquet")) and not (here / f).is_symlink():
                        found.append(here / f)
                if len(found) > 500:
                    break
        return [self.relative(p) if p.is_relative_to(self.root) else str(p) for p in found]

    # ----- discovery ------------------------------------------------------------------------------------------
    def names(self) -> list[tuple[str, str]]:
        """(name, kind) of every run (kind 'train') and compare output ('compare') under the runs directory."""
        found: list[tuple[str, str]] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            depth = len(here.relative_to(self.root).parts)
            keep = []
            for d in sorted(dirnames):
                child = here / d
                if child.is_symlink() or d in SKIP_DIRS or child == self.data_dir or d.startswith("."):
                    continue
                keep.append(d)
            dirnames[:] = keep if depth < 3 else []
            if here == self.root:
                continue
            name = self.relative(here)
            if any(m in filenames for m in COMPARE_MARKERS):
                found.append((name, "compare"))
            elif any(m in filenames for m in RUN_MARKERS) or (name in self.launched):
                found.append((name, "train"))
                dirnames[:] = []  # a run's own subdirectories are not runs
        with self._lock:
            for name in self.launched:
                if name not in {n for n, _ in found}:
                    found.append((name, "train"))
        return sorted(found)

    def summary(self, name: str, kind: str | None = None) -> dict[str, Any]:
        """What the runs list shows of one run: state, progress, last metrics, adapter size."""
        d = self.run_dir(name)
        kind = kind or ("compare" if any((d / m).is_file() for m in COMPARE_MARKERS) else "train")
        config = self.parsed(d / ("compare-config.yaml" if kind == "compare" else "config.yaml"), read_yaml)
        if kind == "compare":
            return self._compare_summary(name, d, config)
        state = self.state(name, d)
        records = self.records(d)
        train = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        retention = [r for r in records if r.get("kind") == "retention"]  # train.eval_retention
        adapter = d / "adapter_model.safetensors"
        max_steps = (config or {}).get("train", {}).get("max_steps") if isinstance(config, dict) else None
        status = read_status(d) or {}
        max_steps = status.get("max_steps") or max_steps  # train.epochs: known once the data is read
        return {
            "name": name,
            "kind": "train",
            **state,
            "step": train[-1]["step"] if train else 0,
            "max_steps": max_steps,
            "objective": (config or {}).get("objective", "sft") if isinstance(config, dict) else None,
            "model": (config or {}).get("model") if isinstance(config, dict) else None,
            "precision": status.get("precision"),  # the resolved one (config.yaml may say auto)
            "last_train": train[-1] if train else None,
            "last_eval": evals[-1] if evals else None,
            "retention": retention[-1] if retention else None,
            "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None,
            "has_adapter": (d / "adapter_config.json").is_file() and adapter.is_file(),
            "launched_here": name in self.launched,
        }

    def _compare_summary(self, name: str, d: Path, config: Any) -> dict[str, Any]:
        results = d / "results.json"
        methods = (config or {}).get("compare", {}).get("methods", []) if isinstance(config, dict) else []
        runs = [d / m for m in methods] + [p for m in methods for p in sorted((d / m).glob("seed-*"))]  # --seeds
        running = any(
            (read_status(r) or {}).get("state") == "running" and pid_alive((read_status(r) or {}).get("pid"))
            for r in runs
        )
        state = "finished" if results.is_file() else ("running" if running else "interrupted")
        return {
            "name": name,
            "kind": "compare",
            "state": state,
            "resumable": False,
            "methods": methods,
            "model": (config or {}).get("model") if isinstance(config, dict) else None,
            "has_adapter": False,
            "adapter_bytes": None,
            "launched_here": False,
        }

    def state(self, name: str, d: Path) -> dict[str, Any]:
        """running | finished | failed | interrupted, whether it can resume, and the error if it failed."""
        launched = self.launched.get(name)
        code = None
        if launched is not None:
            code = launched.process.poll()
            if code is None:
                return {"state": "running", "resumable": False, "error": None, "pid": launched.process.pid}
        # read after the poll: a process that has ended wrote its last status before it did (read before, the file
        # could still say running for a run that has since finished, and the run would show as killed)
        status = read_status(d) or {}
        if launched is not None and (status.get("updated") or 0) < launched.started:
            status = {}  # the status of an earlier attempt: this one ended before the trainer wrote its own
        error = status.get("error")
        state = status.get("state")
        if state == "running":
            here = status.get("host") in (None, socket.gethostname())
            if here and pid_alive(status.get("pid")) and code is None:
                return {"state": "running", "resumable": False, "error": None, "pid": status.get("pid")}
            state = "interrupted"  # the process is gone without saying how it ended: killed
        if state is None:
            if code is not None:
                state = (
                    "interrupted"
                    if code in (130, 143, -signal.SIGINT, -signal.SIGTERM)
                    else ("finished" if code == 0 else "failed")
                )
                error = error or (self.last_error(d) if state == "failed" else None)
            elif (d / "adapter_model.safetensors").is_file():
                state = "finished"
            elif (d / "checkpoints").is_dir():
                state = "interrupted"
            else:
                state = "failed"
                error = "no status, metrics or adapter: the run never started training"
        resumable = state in ("interrupted", "failed") and bool(list_checkpoints(d / "checkpoints"))
        return {"state": state, "resumable": resumable, "error": error, "pid": None, "exit_code": code}

    def last_error(self, d: Path) -> str | None:
        lines = [line for line in self.log_text(d, 4000).splitlines() if line.strip()]
        return lines[-1].strip() if lines else None

    def log_text(self, d: Path, limit: int = 20000, offset: int | None = None) -> str:
        path = d / LOG_FILE
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - limit) if offset is None else min(offset, size)
            f.seek(start)
            return f.read().decode("utf-8", errors="replace")

    def details(self, name: str) -> dict[str, Any]:
        d = self.run_dir(name)
        info = self.summary(name)
        log = self.log_text(d)
        shown = self.config_file(d)
        info["config"] = read_yaml(shown) if shown else None
        info["config_yaml"] = shown.read_text(encoding="utf-8", errors="replace") if shown else ""
        info["log"] = log
        info["progress"] = progress_line(log)
        info["files"] = sorted(p.name for p in d.iterdir() if not p.name.startswith("."))
        return info

    def parsed(self, path: Path, parse, missing: Any = None) -> Any:
        """``parse(path)``, read again only when the file changed (the runs list refreshes every few seconds and
        a run's stream every half second, over metrics of many thousand steps); ``missing`` when absent."""
        try:
            stat = path.stat()
        except OSError:
            return missing
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._parsed.get(path)
        if cached is None or cached[0] != key:
            cached = (key, parse(path))
            self._parsed[path] = cached
        return cached[1]

    def records(self, d: Path) -> list[dict[str, Any]]:
        """The run's metrics records (cached, see ``parsed``)."""
        return self.parsed(d / "metrics.jsonl", read_metrics, [])

    def config_file(self, d: Path) -> Path | None:
        """The config a run directory shows: the trainer's resolved one, the dashboard's, or compare's."""
        return next((d / f for f in ("config.yaml", LAUNCH_FILE, "compare-config.yaml") if (d / f).is_file()), None)

    def metrics(self, name: str, since: int = 0) -> dict[str, Any]:
        d = self.run_dir(name)
        records = self.records(d)
        reset = since > len(records)  # a resumed run rewrote its records after the checkpoint
        start = 0 if reset else max(since, 0)
        return {"records": records[start:], "next": len(records), "reset": reset}

    # ----- processes ------------------------------------------------------------------------------------------
    def launch(self, name: str, config_file: Path, resume: bool = False) -> subprocess.Popen:
        """``lorakit train CONFIG [--resume]`` as a child process in the runs directory, its output in train.log."""
        d = self.run_dir(name)
        with self._lock:
            current = self.launched.get(name)
            if current is not None and current.process.poll() is None:
                raise Conflict(f"run {name!r} is already running (pid {current.process.pid})")
            cmd = [sys.executable, "-m", "lorakit", "train", self.relative(config_file), "--set", f"output_dir={name}"]
            if resume:
                cmd.append("--resume")
            log = open(d / LOG_FILE, "ab")  # noqa: SIM115 (closed when the process is reaped)
            log.write(f"$ lorakit train {' '.join(cmd[4:])}\n".encode())
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            process = subprocess.Popen(
                cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip
            if current is not None:
                current.log.close()
            self.launched[name] = Launched(process, log)
        return process

    def stop(self, name: str) -> int:
        """Ctrl-C for the run: the trainer writes a checkpoint at the current step and exits (resumable)."""
        d = self.run_dir(name)
        launched = self.launched.get(name)
        if launched is not None and launched.process.poll() is None:
            os.killpg(launched.process.pid, signal.SIGINT)
            return launched.process.pid
        status = read_status(d) or {}
        pid = status.get("pid")
        if status.get("state") == "running" and status.get("host") == socket.gethostname() and pid_alive(pid):
            if not is_lorakit_process(pid):
                raise Conflict(f"process {pid} named in {d / 'status.json'} is not lorakit's; not signalled")
            os.kill(pid, signal.SIGINT)
            return pid
        raise Conflict(f"run {name!r} is not running")

    def resume(self, name: str) -> subprocess.Popen:
        d = self.run_dir(name)
        state = self.state(name, d)
        if state["state"] == "running":
            raise Conflict(f"run {name!r} is running; stop it before resuming")
        if not state["resumable"]:
            raise Conflict(f"run {name!r} ({state['state']}) has no checkpoint to resume from")
        return self.launch(name, d / "config.yaml", resume=True)

    def delete(self, name: str) -> None:
        """Remove a run or compare output that is not running, with everything in it. The directory is first
        renamed to a hidden one beside it (one atomic step, made durable: ``durable.set_aside``), so a removal cut
        short never leaves a half run in the list; what a crash leaves of it is removed by the next delete in that
        folder, or when a dashboard opens the runs directory."""
        d = self.run_dir(name)
        listed = dict(self.names())
        if name not in listed:
            raise NotFound(f"{name!r} is not a run or compare output in {self.root}; only runs can be deleted")
        if self.data_dir.is_relative_to(d):
            raise PathRefused(f"run {name!r} holds the data directory {self.data_dir}; not deleted")
        for other in [n for n in listed if n == name or n.startswith(name + "/")]:
            if self.state(other, self.root / other)["state"] == "running":
                raise Conflict(f"run {other!r} is running; stop it before deleting {name!r}")
        with self._lock:
            for other in [n for n in self.launched if n == name or n.startswith(name + "/")]:
                self.launched.pop(other).log.close()
            durable.recover(d.parent, kinds=("del",))  # what a delete cut short by a crash left here
            doomed = durable.set_aside(d)
        durable.remove(doomed)

    def close(self, wait_s: float = 30.0) -> None:
        """Stop the runs this dashboard launched (each writes its checkpoint), waiting up to ``wait_s``."""
        alive = [launched for launched in self.launched.values() if launched.process.poll() is None]
        for launched in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launched.process.pid, signal.SIGINT)
        deadline = time.monotonic() + wait_s
        for launched in alive:
            try:
                launched.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                launched.process.kill()
        for launched in self.launched.values():
            launched.log.close()


def progress_line(log: str) -> str:
    """The last line of the log as a terminal would show it (progress bars redraw with carriage returns)."""
    for line in reversed(log.replace("\r\n", "\n").split("\n")):
        for part in reversed(line.split("\r")):
            if part.strip():
                return part.strip()
    return ""


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
