"""The step loop of a training run: steps, their metrics and progress, periodic evaluations and checkpoints,
stop requests at step boundaries, NaN and fp16-overflow policies (``lorakit.train.trainer`` sets it up)."""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import durable
from ..data import Example, batch_indices
from ..precision import Precision, decide
from . import distributed as dist
from . import fsdp, signals
from .checkpoint import prune_checkpoints, save_checkpoint, step_dir
from .config import RunConfig
from .evaluate import EvalResult, evaluate, pad_id
from .metrics import MetricsLog
from .objectives import PreferenceEval, evaluate_pairs, objective_for
from .tasks import TASKS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..methods.base import Method
    from .objectives import SFT


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss); the last good checkpoint is kept."""


def printer(enabled: bool):
    """print to stderr on the process that reports (rank 0); a no-op on the others."""

    def log(message: str) -> None:
        if enabled:
            print(message, file=sys.stderr, flush=True)

    return log


@dataclass(kw_only=True)
class Loop:
    """The step loop and its bookkeeping (kept apart from setup so each part reads top to bottom)."""

    cfg: RunConfig
    ctx: dist.Context
    model: nn.Module  # the model whose parameters train (sharded under FSDP)
    wrapped: nn.Module  # what the steps call: the model, or its DDP wrapper
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rows: list[Example]
    metrics: MetricsLog
    ckpt_root: Path
    method: Method
    step: int = 0
    skipped: int = 0
    step_rates: list[float] = field(default_factory=list)  # tokens per second of each step this process ran
    last_good: Path | None = None
    sharded: bool = False  # FSDP: every rank takes part in each forward, evaluations and saves included
    objective: SFT | None = None  # what a step minimises (lorakit.train.objectives); default: SFT
    precision: Precision = field(default_factory=lambda: decide("fp32", "cpu"))  # forwards under its context
    scaler: torch.amp.GradScaler | None = None  # fp16-mixed: scales the loss, skips steps whose gradients overflow
    stops: signals.StopRequests = field(default_factory=signals.StopRequests)  # SIGINT / SIGTERM received
    log: Callable[[str], None] = print  # prints on the main process only (``printer``)

    def __post_init__(self) -> None:
        self.pad = pad_id(self.tokenizer)
        self.task = TASKS[self.cfg.task]
        self.objective = self.objective or objective_for(self.cfg)

    def evaluate(self, rows: list) -> EvalResult | PreferenceEval:
        """The held-out figures, computed as the steps compute (under the precision's autocast). Every process
        calls it: each scores its share of the rows and all get the figures of all of them (``evaluate``); only
        the main process writes and prints them (``metrics``, ``log``)."""
        cfg, size = self.cfg, self.eval_batch_size
        with self.precision.context(self.ctx.device):
            if self.objective.name != "sft":
                return evaluate_pairs(self.objective, self.model, rows, self.pad, size, self.ctx, self.sharded)
            return evaluate(
                self.model, self.tokenizer, rows, batch_size=size, generate=cfg.train.generate_eval,
                max_new_tokens=cfg.train.max_new_tokens, task=self.task, ctx=self.ctx, lockstep=self.sharded,
            )  # fmt: skip

    @property
    def eval_batch_size(self) -> int:
        """Rows (pairs, for preference objectives) per evaluation forward on each process: train.eval_batch_size,
        by default the rows of one training forward (train.batch_size / (processes x train.grad_accum))."""
        t = self.cfg.train
        return t.eval_batch_size or max(1, t.batch_size // (self.ctx.world_size * t.grad_accum))

    @property
    def evaluates(self) -> bool:
        """Whether this process runs whole-model work that one process does alone: rank 0, or every rank in step
        when the model is sharded (each forward gathers the shards). Evaluations are not such work: every
        process scores its share of the rows (``evaluate``)."""
        return self.ctx.is_main or self.sharded

    @property
    def tokens_per_second(self) -> float:
        """The median of the steps' throughputs: one stall (a swap, a busy neighbour) does not move it."""
        return statistics.median(self.step_rates) if self.step_rates else 0.0

    def run(self, start_step: int, eval_rows: list[Example], progress: bool) -> float:
        """Steps from ``start_step`` to train.max_steps; a stop request (SIGINT, SIGTERM) ends the run at a
        step boundary by raising ``signals.Interrupted``. Returns the last step's loss."""
        t = self.cfg.train
        self.step = start_step
        bar = progress_bar(t.max_steps, start_step, progress and self.ctx.is_main)
        batches = batch_indices(len(self.rows), t.batch_size, self.cfg.seed, start=start_step)
        loss = float("nan")
        self.wrapped.train()
        try:
            for position, indices in batches:
                if position >= t.max_steps:
                    break
                with self.stops.deferred():
                    loss = self._record_step(position, indices, bar, progress)
                if self.stops.agreed or (self.stops.pending and not self.ctx.distributed):
                    self.stops.stop()
                # Under torchrun the processes evaluate and checkpoint in lockstep: a signal waits for the next
                # step's all-reduce, which tells every process to stop after that step.
                with self.stops.deferred() if self.ctx.distributed else contextlib.nullcontext():
                    self._periodic(eval_rows)
        finally:
            if bar is not None:
                bar.close()
        return loss

    def _record_step(self, position: int, indices: list[int], bar, progress: bool) -> float:
        """One step, its metrics record, and its progress (the bar, or a line every train.log_every steps)."""
        started = time.perf_counter()
        loss, tokens, grad_norm, stats = self._step(indices)
        seconds = time.perf_counter() - started
        self.step = position + 1
        rate = tokens / seconds if seconds > 0 else 0.0
        self.step_rates.append(rate)
        lr = self.scheduler.get_last_lr()[0]
        record = {"kind": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": tokens, "seconds": round(seconds, 6), "tokens_per_second": round(rate, 1), **stats}  # fmt: skip
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.get_scale()  # after this step's update
        self.metrics.write(record)
        shown = {"acc": f"{stats['accuracy']:.2f}", "margin": f"{stats['margin']:.3f}"} if stats else {}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", **shown, tok_s=f"{self.tokens_per_second:.0f}")
        elif self._log_due(progress):
            extra = "".join(f"  {k} {v}" for k, v in shown.items())
            self.log(
                f"step {self.step}/{self.cfg.train.max_steps}  loss {loss:.4f}  lr {lr:.3g}{extra}  {rate:.0f} tokens/s"
            )
        return loss

    def _log_due(self, progress: bool) -> bool:
        """Whether this step prints a line: without a progress bar, every train.log_every steps and the last."""
        every = self.cfg.train.log_every
        last = self.step == self.cfg.train.max_steps
        return not progress and bool(every) and (self.step % every == 0 or last)

    def _periodic(self, eval_rows: list[Example]) -> None:
        t = self.cfg.train
        if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
            self.checkpoint(self.step)
        if t.eval_every and eval_rows and self.step % t.eval_every == 0 and self.step < t.max_steps:
            result = self.evaluate(eval_rows)  # every process its share; no process waits for another's
            self.metrics.write({"kind": "eval", "step": self.step, **result.as_record()})  # the main process's
            self.log(f"\n{result.describe(f'at step {self.step}')}")
            self.wrapped.train()

    def checkpoint(self, step: int) -> Path | None:
        if self.sharded:
            return self._sharded_checkpoint(step)
        path = None
        if self.ctx.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            path = save_checkpoint(
                self.ckpt_root, step, self.model, self.optimizer, self.scheduler, self.method, self._state()
            )
            prune_checkpoints(self.ckpt_root, self.cfg.train.keep_last)
            self.last_good = path
        dist.barrier(self.ctx)
        return path

    def _sharded_checkpoint(self, step: int) -> Path:
        """Every rank writes its shards into one temporary directory; rank 0 adds the gathered adapter and the
        JSON state and renames it into place once all are done."""
        final = step_dir(self.ckpt_root, step)
        tmp = durable.sibling(final, "tmp", "sharded")  # one name on every rank; a crashed save's is replaced
        if self.ctx.is_main:
            durable.remove(tmp)
            tmp.mkdir(parents=True)
        dist.barrier(self.ctx)
        values = fsdp.gathered_trainable(self.model)
        if self.ctx.is_main:
            self.method.save(self.model, tmp, values=values)
        fsdp.save_sharded(
            tmp, self.ctx.rank, self.model, self.optimizer, self.scheduler, {"step": step, **self._state()}
        )
        dist.barrier(self.ctx)
        if self.ctx.is_main:
            fsdp.publish(tmp, final, self.ckpt_root)
            prune_checkpoints(self.ckpt_root, self.cfg.train.keep_last)
        self.last_good = final
        dist.barrier(self.ctx)
        return final

    def _state(self) -> dict:
        """What a checkpoint records of the loop beside the tensors (JSON): the skipped steps, the precision, and
        fp16-mixed's loss scaler (its scale and growth tracker, plain numbers)."""
        state = {"skipped": self.skipped, "precision": self.precision.name}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _step(self, indices: list[int]) -> tuple[float, int, float | None, dict[str, float]]:
        """One optimizer step over the global batch ``indices``: (loss, tokens processed, gradient norm or None
        when the step was dropped, the objective's metrics)."""
        t = self.cfg.train
        objective = self.objective
        examples = [self.rows[i] for i in indices]
        units = objective.units(examples)  # the global normalisers: every micro-batch's loss is its share
        processed = objective.processed(examples)
        mine = examples[self.ctx.rank :: self.ctx.world_size]
        micro = [mine[k :: t.grad_accum] for k in range(t.grad_accum)]
        micro = [m for m in micro if m]
        totals = torch.zeros(1 + len(objective.metrics) + len(signals.HANDLED), device=self.ctx.device,
                             dtype=torch.float64)  # fmt: skip
        totals[-len(signals.HANDLED) :] = torch.tensor(self.stops.as_counts())  # with the all-reduce: see ``run``
        for k, part in enumerate(micro):
            sync = k == len(micro) - 1
            with contextlib.nullcontext() if sync else dist.no_sync(self.wrapped):
                with self.precision.context(self.ctx.device):  # the forward only: backward follows its casts
                    share, sums = objective.loss(self.wrapped, self.model, part, self.pad, self.ctx.device, units)
                scaled = share * self.ctx.world_size  # DDP averages over processes
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            part = torch.stack([share.detach().double(), *(sums[m].double() for m in objective.metrics)])
            totals[: len(part)] += part
        totals = dist.all_reduce_sum(totals, self.ctx).tolist()
        self.stops.agree(totals[-len(signals.HANDLED) :])
        totals = totals[: -len(signals.HANDLED)]
        loss = totals[0]
        stats = objective.summarize(dict(zip(objective.metrics, totals[1:], strict=True)), units)
        if not math.isfinite(loss):
            self._non_finite("loss", loss)
            return loss, processed, None, stats
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # the true gradients, for the norm and the clipping
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        # One norm over every gradient (after DDP's all-reduce, so all processes agree): it detects NaN or
        # infinite gradients under a finite loss, and clipping reuses it.
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        grad_norm = norm.item()
        if not math.isfinite(grad_norm):
            if self.scaler is not None:
                self._overflow(grad_norm)
            else:
                self._non_finite("the gradient norm", grad_norm)
            return loss, processed, None, stats
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, t.max_grad_norm, norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, processed, grad_norm, stats

    def _overflow(self, value: float) -> None:
        """fp16-mixed: gradients overflowed at this loss scale. The scaler skips the update and lowers the scale
        (as it is built to, several times early in a run); counted as a skipped step, never a reason to stop."""
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # sees the infinite gradients unscale_ found: no update
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.skipped += 1
        self.log(
            f"\nstep {self.step + 1}: the gradient norm is {value} at loss scale {scale:g}; step skipped by the "
            f"fp16 loss scaler, scale now {self.scaler.get_scale():g} ({self.skipped} skipped so far)"
        )

    def _non_finite(self, what: str, value: float) -> None:
        """A NaN or infinite loss or gradient: drop the update; skip the step (counted) or stop."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.train.nan_policy == "skip":
            self.skipped += 1
            self.scheduler.step()
            self.log(
                f"\nstep {self.step + 1}: {what} is {value}; step skipped ({self.skipped} so far, train.nan_policy=skip)"
            )
            return
        where = f"; the last good checkpoint is {self.last_good}" if self.last_good else ""
        raise TrainingStopped(
            f"{what} became {value} at step {self.step + 1}: stopping{where}. Lower train.lr, enable "
            "train.max_grad_norm, or set train.nan_policy=skip"
        )


def progress_bar(total: int, initial: int, enabled: bool):
    """The training bar on stderr, or None where the run prints log lines instead."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
