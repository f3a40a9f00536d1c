"""lm-evaluation-harness as an optional backend of ``lorakit eval --lm-eval TASKS`` (the ``lorakit[eval]`` extra).

The harness's own Hugging Face model class (``lm_eval.models.huggingface.HFLM``) is given the model lorakit
loaded, with its adapter: the tasks run once with every adapter off (the base model, ``lorakit.disabled``) and
once with them on, on the same loaded weights, and ``compare`` lines up every metric the harness reports before
and after. Tasks are the harness's by name, or the user's own task YAML files in a folder (``include``); nothing
is downloaded that a task does not ask for (a task over local files runs offline).

Scores are the harness's, computed by its code: lorakit only chooses the model and switches the adapter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .adapters import disabled

INSTALL = "pip install 'lorakit[eval]' (or pip install lm-eval)"
_NOT_METRICS = ("alias", "name", "sample_len", "sample_count")


@dataclass(frozen=True)
class HarnessScore:
    """One metric of one task, before (base) and after (adapter on)."""

    task: str
    metric: str  # the harness's key, e.g. "acc,none"
    before: float | None
    after: float | None

    @property
    def change(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before

    def as_record(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "before": self.before, "after": self.after,
                "change": self.change}  # fmt: skip


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ValueError(f"--lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL}") from err
    return TaskManager


def task_manager(include: str | os.PathLike | None = None):
    """The harness's task registry, with the task YAML files under ``include`` added.

    Raises:
        ValueError: the harness is missing, or ``include`` is not a folder.
    """
    manager_class = _lm_eval()
    if include is not None and not Path(include).is_dir():
        raise ValueError(f"--lm-eval-include {include}: not a folder of task YAML files")
    return manager_class(include_path=str(include) if include is not None else None)


def check_tasks(manager, tasks: Sequence[str]) -> list[str]:
    """``tasks`` as the harness knows them; an unknown name is an error that says where tasks come from."""
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise ValueError("--lm-eval needs at least one task name, e.g. --lm-eval hellaswag,arc_easy")
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        raise ValueError(
            f"--lm-eval: unknown task(s) {', '.join(unknown)}: name the harness's tasks (lm_eval --tasks list) or "
            "put your own task YAML files in a folder and pass --lm-eval-include FOLDER"
        )
    return names


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    manager,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, dict[str, float]]:
    """The harness's results for ``model`` as it stands: {task: {metric: value}} (numbers only)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
    with context():
        out = simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            log_samples=False, bootstrap_iters=0, verbosity="WARNING",
        )  # fmt: skip
    results = (out or {}).get("results", {})
    return {
        task: {k: float(v) for k, v in metrics.items() if k not in _NOT_METRICS and _is_number(v) and "stderr" not in k}
        for task, metrics in results.items()
    }


def before_and_after(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    manager,
    *,
    base: nn.Module | None = None,
    **options,
) -> list[HarnessScore]:
    """Every metric of ``tasks`` for the base (``base``, or ``model`` with its adapters off) and for ``model``."""
    if base is None:
        with disabled(model):
            before = run_tasks(model, tokenizer, tasks, manager, **options)
    else:
        before = run_tasks(base, tokenizer, tasks, manager, **options)
    after = run_tasks(model, tokenizer, tasks, manager, **options)
    return compare(before, after)


def compare(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> list[HarnessScore]:
    scores = []
    for task in sorted(set(before) | set(after)):
        metrics = sorted(set(before.get(task, {})) | set(after.get(task, {})))
        scores += [HarnessScore(task, m, before.get(task, {}).get(m), after.get(task, {}).get(m)) for m in metrics]
    return scores


def table(scores: Sequence[HarnessScore]) -> str:
    """The scores as aligned text lines: task, metric, before, after, change."""
    lines = [f"{'task':<28} {'metric':<18} {'before':>8} {'after':>8} {'change':>8}"]
    for s in scores:
        lines.append(f"{s.task:<28} {s.metric:<18} {_num(s.before):>8} {_num(s.after):>8} {_signed(s.change):>8}")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _device(model: nn.Module):
    param = next(model.parameters(), None)
    return "cpu" if param is None else param.device
