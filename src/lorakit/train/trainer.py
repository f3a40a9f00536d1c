"""The training loop: one config in, a tested adapter out, on one process or many (torchrun + DDP).

Loss normalisation: each optimizer step's loss is the sum of token losses over the whole global batch
divided by the number of labelled tokens in it. Every process and micro-batch scales its part so that
DDP's gradient averaging yields exactly that, which makes 1 process x batch 8, 2 processes x 4 and
gradient accumulation give the same update.

Precision (``precision``, see ``lorakit.precision``): decided once per run on its device (``auto`` by the
hardware), printed first and recorded in status.json and metrics.jsonl. The base loads in its storage dtype,
everything that trains is in its trained dtype (float32 for the mixed precisions), the forward of every step
and evaluation runs under its autocast and the backward outside it. fp16-mixed scales the loss with a
GradScaler, whose skipped steps are counted like train.nan_policy=skip's and whose state the checkpoints keep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from .. import adapters
from ..combine import combine
from ..config import LoraConfig
from ..data import (
    IGNORE,
    DataStats,
    Example,
    PreferencePair,
    batch_indices,
    pack,
    read_rows,
    split_eval,
    tokenize_pairs,
    tokenize_rows,
)
from ..fastpath import return_freed_memory_to_os
from ..io import load_adapter, save_adapter
from ..layers import fuse_forwards
from ..methods.lora import LoraMethod
from ..models import load_model, resolve_model_dir
from ..precision import Precision, decide
from ..quant import quantize
from ..state import registry
from ..targeting import HEAD_NAMES
from . import distributed as dist
from . import fsdp, signals
from .checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint, step_dir
from .config import RunConfig, steps_for_epochs
from .evaluate import EvalResult, evaluate, pad_id
from .metrics import MetricsLog, RunStatus, plot_metrics, read_metrics
from .objectives import REFERENCE, TRAINED, PreferenceEval, disable_dropout, evaluate_pairs, objective_for
from .objectives import precompute_reference as precompute_reference_logps
from .outdir import check_output_dir
from .tasks import TASKS
from .trackers import open_trackers


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss); the last good checkpoint is kept."""


@dataclass(kw_only=True)
class RunResult:
    """What a finished run gives back (the files are in ``output_dir``)."""

    output_dir: Path
    steps: int
    final_loss: float
    eval: EvalResult | PreferenceEval | None
    eval_before: EvalResult | PreferenceEval | None = None
    tokens_per_second: float = 0.0
    wall_seconds: float = 0.0
    skipped_steps: int = 0  # steps dropped: train.nan_policy=skip, and fp16-mixed's GradScaler on overflow
    precision: Precision | None = None  # what the run stored and computed in (``auto`` resolved)
    data: dict[str, DataStats] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)  # the trained module, for callers that measure it


def prepare_data(
    cfg: RunConfig, tokenizer, model_config=None
) -> tuple[list[Example], list[Example], dict[str, DataStats]]:
    d = cfg.data
    if cfg.objective != "sft":
        return _prepare_pairs(cfg, tokenizer)
    task = TASKS[cfg.task]

    def tokenize(row, where):
        return task.tokenize(row, where, tokenizer, d.completion_only, model_config)

    train, held, stats = _tokenized_split(
        cfg, lambda rows: tokenize_rows(rows, tokenizer, d.max_length, d.completion_only, tokenize)
    )
    if d.packing:
        if task.name != "causal-lm":
            raise ValueError(f"data.packing works for causal-lm only, not task={cfg.task!r}; set data.packing=false")
        train = pack(train, d.max_length, d.packing_strategy)
    if not any(label != IGNORE for e in train for label in e.labels):
        raise ValueError(f"{d.train}: no token carries a loss (every completion is empty or truncated away)")
    return train, held, stats


def _prepare_pairs(
    cfg: RunConfig, tokenizer
) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, DataStats]]:
    """Preference rows as (chosen, rejected) pairs, for objective=dpo or orpo."""
    return _tokenized_split(cfg, lambda rows: tokenize_pairs(rows, tokenizer, cfg.data.max_length))


def _tokenized_split(cfg: RunConfig, tokenize) -> tuple[list, list, dict[str, DataStats]]:
    """The training rows and the held-out rows (data.eval, or data.eval_fraction of data.train, at most
    data.max_eval_rows), each tokenized by ``tokenize(rows) -> (examples, stats)``. The split comes before
    tokenizing so that each side's statistics count its own rows and tokens."""
    d = cfg.data
    train = read_rows(d.train)
    if d.eval:
        held = read_rows(d.eval)
    else:
        train, held = split_eval(train, d.eval_fraction, cfg.seed)
    if d.max_eval_rows is not None:
        held = held[: d.max_eval_rows]
    train, stats = tokenize(train)
    stats = {"train": stats}
    if held:
        held, stats["eval"] = tokenize(held)
    return train, held, stats


def _schedule(cfg: RunConfig):
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.scheduler == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        return max(0.0, 1 - progress) if t.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def adamw(groups: list, **kwargs) -> torch.optim.AdamW:
    """AdamW, as PyTorch's fused kernel (one pass over all parameters) where it supports the parameters:
    floating point, all on one CPU or CUDA device. Same update as the default implementation, to rounding;
    on the benchmark's 4.9 M LoRA parameters 11 ms a step against 60 ms on CPU."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = (
        bool(params)
        and len({p.device for p in params}) == 1
        and params[0].device.type in ("cpu", "cuda")
        and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    )
    return torch.optim.AdamW(groups, fused=fused, **kwargs)


def build_optimizer(
    model: nn.Module, cfg: RunConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters; with LoRA+ the B matrices get lr * loraplus_lr_ratio."""
    t = cfg.train
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = t.loraplus_lr_ratio
    is_b = [".lora_B." in n or ".lora_embedding_B." in n for n, _ in params]
    groups = [{"params": [p for (_, p), b in zip(params, is_b, strict=True) if not b or ratio is None], "lr": t.lr}]
    if ratio is not None:
        groups.append({"params": [p for (_, p), b in zip(params, is_b, strict=True) if b], "lr": t.lr * ratio})
    optimizer = adamw(groups, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg))
    return optimizer, scheduler


def train(cfg: RunConfig, resume: bool = False, progress: bool = True, method=None) -> RunResult:
    """Run the training described by ``cfg``; see the module docstring for the loss normalisation.

    ``method`` (see ``lorakit.methods``) decides what trains; the default is LoRA with ``cfg.lora``. The steps
    below read top to bottom: output directory, model, data, method, optimizer, resume, loop, finish.
    """
    started = time.perf_counter()
    ctx = dist.setup()
    log = _printer(ctx.is_main)
    precision = decide_precision(cfg, ctx)  # before anything is written: a precision the device lacks is refused
    if ctx.device.type == "cpu" and lean_cpu_memory(cfg):
        return_freed_memory_to_os()  # peak RSS follows the live tensors (see lorakit.fastpath)
    out = setup_output(cfg, ctx=ctx, resume=resume, log=log)
    status = RunStatus(out, enabled=ctx.is_main)
    status.set("running")
    with signals.installed() as stops:
        try:
            result = _train(cfg, out, ctx=ctx, resume=resume, progress=progress, method=method, log=log,
                            stops=stops, status=status, precision=precision)  # fmt: skip
        except KeyboardInterrupt as err:
            stops.ignore()  # the status is written whatever comes next (torchrun signals the processes left)
            status.set("interrupted", error=f"stopped by {err}" if isinstance(err, signals.Interrupted) else None)
            raise
        except BaseException as err:
            stops.ignore()
            status.set("failed", error=f"{type(err).__name__}: {err}")
            raise
        stops.ignore()
        status.set("finished", step=result.steps)
    result.wall_seconds = time.perf_counter() - started
    return result


def _train(
    cfg: RunConfig,
    out: Path,
    *,
    ctx: dist.Context,
    resume: bool,
    progress: bool,
    method,
    log,
    stops,
    status,
    precision: Precision,
) -> RunResult:
    """``train`` after the output directory: model, data, method, optimizer, resume, loop, finish."""
    _check_data_files(cfg)  # before the model loads: a wrong path should not cost a model load to learn
    log(precision.describe())
    record = precision_record(precision)
    status.precision, status.precision_reason = record["precision"], record["reason"]
    _seed(cfg.seed)
    model, tokenizer = setup_model(cfg, ctx=ctx, precision=precision)
    train_rows, eval_rows, stats = setup_data(cfg, tokenizer=tokenizer, model=model, ctx=ctx, log=log)
    cfg = _with_epoch_steps(cfg, len(train_rows), log)
    status.max_steps = cfg.train.max_steps
    status.set("running")
    model, method = setup_method(cfg, model=model, method=method, ctx=ctx, log=log, precision=precision)
    optimizer, scheduler = build_optimizer(model, cfg)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=ctx.is_main)
    loop = _Loop(
        cfg=cfg, ctx=ctx, model=model, wrapped=model, tokenizer=tokenizer, optimizer=optimizer,
        scheduler=scheduler, rows=train_rows, metrics=metrics, ckpt_root=out / "checkpoints", method=method,
        sharded=sharded(cfg, ctx), objective=objective_for(cfg), stops=stops, log=log, precision=precision,
        scaler=grad_scaler(precision, ctx.device),
    )  # fmt: skip
    start_step = setup_resume(loop, resume=resume, log=log)
    metrics.trackers = open_trackers(cfg, out, start_step, enabled=ctx.is_main, resolved=record)
    metrics.write({"kind": "run", "step": start_step, **record})  # at each (re)start: a resume may decide anew
    try:
        result = _run(
            loop, out=out, stats=stats, eval_rows=eval_rows, start_step=start_step, progress=progress, log=log
        )
    except BaseException:
        metrics.trackers.finish(out, failed=True)
        raise
    metrics.trackers.finish(out)
    result.model = model
    return result


def _run(loop: _Loop, *, out: Path, stats, eval_rows, start_step: int, progress: bool, log) -> RunResult:
    """From the set-up loop at ``start_step`` to the saved adapter: reference, DDP wrapper, evaluations, steps."""
    cfg, ctx, model, train_rows = loop.cfg, loop.ctx, loop.model, loop.rows
    if cfg.dpo.precompute_reference:
        batch = max(1, cfg.train.batch_size // (ctx.world_size * cfg.train.grad_accum))
        with loop.precision.context(ctx.device):  # the reference scores as the steps' reference forwards would
            precompute_reference_logps(model, train_rows, loop.pad, ctx, batch, progress)
        log(f"reference log-probabilities of {len(train_rows)} training pairs computed")
    if not loop.sharded:  # after the checkpoint is loaded: DDP starts from those weights
        loop.wrapped = dist.wrap(model, ctx)
    eval_before = evaluate_before(loop, eval_rows=eval_rows, start_step=start_step, log=log)
    dist.barrier(ctx)
    try:
        final_loss = loop.run(start_step, eval_rows, progress)
    except KeyboardInterrupt as err:
        path = loop.checkpoint(loop.step)
        cause = f" by {err}" if isinstance(err, signals.Interrupted) else ""
        log(f"\ninterrupted{cause} after step {loop.step}: checkpoint written to {path}; continue with --resume")
        raise
    result = RunResult(
        output_dir=out, steps=loop.step, final_loss=final_loss, eval=None, eval_before=eval_before,
        tokens_per_second=loop.tokens_per_second, skipped_steps=loop.skipped, precision=loop.precision, data=stats,
    )  # fmt: skip
    finish(loop, result=result, eval_rows=eval_rows, log=log)
    return result


def setup_output(cfg: RunConfig, *, ctx: dist.Context, resume: bool, log=print) -> Path:
    """The output directory, checked (no run overwritten or continued by accident, see ``outdir``) and written
    with the resolved config."""
    out = Path(cfg.output_dir)
    for note in check_output_dir(out, cfg, resume):
        log(note)
    if not ctx.is_main:
        return out
    if cfg.overwrite and not resume and out.exists():
        for name in ("checkpoints", "metrics.jsonl", "adapter_config.json", "adapter_model.safetensors", "loss.png",
                     "tensorboard", "mlflow.db", "mlartifacts", "wandb", "trackers.json"):  # fmt: skip
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as err:
        raise ValueError(
            f"output_dir {out} is not writable ({err.strerror or err}); choose a directory you can write to "
            "or fix its permissions"
        ) from None
    return out


def sharded(cfg: RunConfig, ctx: dist.Context) -> bool:
    """Whether this run shards the model across processes (FSDP)."""
    return cfg.train.strategy == "fsdp" and ctx.distributed


def decide_precision(cfg: RunConfig, ctx: dist.Context) -> Precision:
    """``cfg.precision`` on this run's device (``auto`` by the hardware; see ``lorakit.precision``)."""
    try:
        return decide(cfg.precision, ctx.device)
    except ValueError as err:
        raise ValueError(f"{err} (on {ctx.device})") from None


def precision_record(precision: Precision) -> dict[str, str]:
    """The resolved precision as status.json, metrics.jsonl and the trackers record it."""
    return {"precision": precision.name, "reason": precision.reason or "set in the config"}


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16-mixed's loss scaler (float16 gradients underflow without it); None for the other precisions."""
    return torch.amp.GradScaler(device.type) if precision.scaled else None


def setup_model(
    cfg: RunConfig, *, ctx: dist.Context | None = None, precision: Precision | None = None
) -> tuple[nn.Module, object]:
    """The base model and its tokenizer, stored in ``precision.storage`` (default: float32). Under FSDP every
    rank builds only the skeleton (parameters on the meta device) and reads its shards of the weights in
    ``setup_method``."""
    skeleton = ctx is not None and sharded(cfg, ctx)
    if skeleton and not any(resolve_model_dir(cfg.model).glob("*.safetensors")):
        raise ValueError(
            f"train.strategy=fsdp reads each process's shards from the model's safetensors files, and "
            f"{resolve_model_dir(cfg.model)} has none: save the model with save_pretrained(safe_serialization=True), "
            "or use train.strategy=ddp"
        )
    dtype = precision.storage if precision is not None else torch.float32
    model, tokenizer = load_model(cfg.model, task=cfg.task, dtype=dtype, skeleton=skeleton)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model} has no tokenizer files; training needs one")
    return model, tokenizer


def setup_data(
    cfg: RunConfig, *, tokenizer, model: nn.Module, ctx: dist.Context, log
) -> tuple[list[Example], list[Example], dict[str, DataStats]]:
    """Training and held-out rows, tokenized; the batch size checked against the processes."""
    train_rows, eval_rows, stats = prepare_data(cfg, tokenizer, model.config)
    for name, s in stats.items():
        log(s.describe(name))
    if cfg.data.packing:
        log(f"packed into {len(train_rows)} sequences of up to {cfg.data.max_length} tokens")
    per_process = cfg.train.batch_size / ctx.world_size
    if cfg.train.batch_size % (ctx.world_size * cfg.train.grad_accum):
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by processes ({ctx.world_size}) x "
            f"train.grad_accum ({cfg.train.grad_accum}); {per_process:g} rows per process does not split evenly"
        )
    return train_rows, eval_rows, stats


def _check_data_files(cfg: RunConfig) -> None:
    d = cfg.data
    if not d.train:
        raise ValueError("data.train is not set: give a .jsonl, .csv, .parquet file or a saved dataset directory")
    for key, path in (("data.train", d.train), ("data.eval", d.eval)):
        if path and not Path(path).exists():
            raise ValueError(
                f"{key}: data file {path} does not exist (a relative path in a config file is read against the "
                "file's directory, one given with --set against the working directory)"
            )


def _with_epoch_steps(cfg: RunConfig, rows: int, log) -> RunConfig:
    """With train.epochs, the config whose train.max_steps makes that many passes over ``rows``."""
    t = cfg.train
    if t.epochs is None:
        return cfg
    steps = steps_for_epochs(t.epochs, rows, t.batch_size)
    log(f"train.epochs={t.epochs:g}: {steps} steps of {t.batch_size} over {rows} training rows")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, max_steps=steps))


def setup_method(
    cfg: RunConfig, *, model: nn.Module, method, ctx: dist.Context, log, precision: Precision | None = None
) -> tuple[nn.Module, object]:
    """The model on its device, quantized and checkpointed as configured, with the method's trainable parts in
    ``precision.trained`` (float32 for the mixed precisions; default: as created); under FSDP, sharded, each
    rank holding its shards of the weights and of the initial adapter."""
    if not any(p.is_meta for p in model.parameters()):  # a skeleton gets its memory when sharded, below
        model = model.to(ctx.device)
    if cfg.quantize:
        log(quantize(model, cfg.quantize, compute_dtype=precision.storage if precision else None).describe())
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kept = adapter_dtype(precision)
    if cfg.dpo.reference_adapter:
        _load_reference(model, cfg, log, kept)
    method = method or LoraMethod(_with_head(cfg, model, log), adapter_dtype=kept)
    model = method.prepare(model)
    if precision is not None:
        cast_trainable(model, precision.trained)
    if cfg.dpo.reference_adapter:
        adapters.set_active(model, [REFERENCE, TRAINED])  # trained = base + reference + trained adapter
    if cfg.objective != "sft" and cfg.dpo.disable_dropout:
        disable_dropout(model)
    if cfg.train.fused_forwards and method.name == "lora":
        fuse_forwards(model)
    log(str(adapters.trainable_summary(model)))
    if sharded(cfg, ctx):
        if method.name != "lora":
            raise ValueError(
                f"train.strategy=fsdp trains LoRA adapters, not the {method.name!r} method; use train.strategy=ddp"
            )
        initial = fsdp.real_parameters(model)  # the adapters, initialised alike on every rank
        fsdp.shard(model, ctx.device, precision)
        fsdp.load_local_shards(model, resolve_model_dir(cfg.model), initial, ctx.device)
        fsdp.fill_dora_magnitudes(model)  # from whole rows, once every rank holds its shards
        log(f"fsdp: {ctx.world_size} processes, {fsdp.local_parameter_bytes(model) / 1e6:.1f} MB of parameters each")
    return model, method


def adapter_dtype(precision: Precision | None) -> str | None:
    """``inject`` / ``load_adapter``'s adapter_dtype for ``precision``: "base" where the adapters are stored as
    the base is (pure bf16); else None, the library's default (float32 adapters over a bf16 or fp16 base)."""
    return "base" if precision is not None and precision.trained == precision.storage != torch.float32 else None


def cast_trainable(model: nn.Module, dtype: torch.dtype) -> int:
    """Every trainable floating-point parameter in ``dtype``, in place: under the mixed precisions what trains is
    float32 whatever created it (trained biases of the bf16 base, a method's own layers, a soft prompt, a full
    fine-tune's weights). A module whose bias trains keeps its frozen matrices as stored (autocast casts them
    for the product) but takes its frozen vectors along: a norm needs its weight and bias in one dtype, and
    they are small. Before the optimizer and any wrapper see them; returns how many parameters changed."""
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if not any(p.requires_grad for p in own):
                continue
            for param in own:
                if param.is_floating_point() and param.dtype != dtype and (param.requires_grad or param.dim() < 2):
                    param.data = param.data.to(dtype)
                    changed += 1
    return changed


def _load_reference(model: nn.Module, cfg: RunConfig, log, kept: str | None = None) -> None:
    """dpo.reference_adapter, frozen, as adapter 'reference' (``kept``: its adapter_dtype); refused where the
    run's adapter could not be written as the exact sum of it and the trained adapter."""
    source = Path(cfg.dpo.reference_adapter)
    try:
        load_adapter(model, source, name=REFERENCE, adapter_dtype=kept)
    except ValueError as err:
        raise ValueError(f"dpo.reference_adapter: {err}") from None
    ref = registry(model).adapters[REFERENCE].config
    reasons = [
        ("it uses DoRA" if ref.use_dora else None),
        ("it trains whole modules (modules_to_save)" if ref.modules_to_save else None),
        ("lora.use_dora is set" if cfg.lora.use_dora else None),
        ("lora.init=pissa" if cfg.lora.init == "pissa" else None),
        ("lora.modules_to_save is set" if cfg.lora.modules_to_save else None),
    ]
    reasons = [r for r in reasons if r]
    if reasons:
        raise ValueError(
            f"dpo.reference_adapter={source}: {'; '.join(reasons)}. The run's adapter is the exact sum of the "
            "reference and the trained adapter, which exists for plain LoRA adapters only: use plain LoRA for both"
        )
    log(f"reference: the base model with the frozen adapter {source}; the trained adapter adds to it")


def setup_resume(loop: _Loop, *, resume: bool, log) -> int:
    """With ``resume``, the newest checkpoint's state; returns the step to start from."""
    checkpoints = list_checkpoints(loop.ckpt_root)
    if not resume:
        return 0
    if not checkpoints:
        loop.metrics.truncate_after(-1)  # the records of an attempt that ended before its first checkpoint
        log("no checkpoint found; starting from step 0")
        return 0
    if fsdp.is_sharded(checkpoints[-1]) != loop.sharded:
        written, now = ("fsdp", "ddp or one process") if not loop.sharded else ("ddp or one process", "fsdp")
        raise ValueError(
            f"checkpoint {checkpoints[-1]} was written with {written} and this run uses {now}: resume with the "
            "strategy and the number of processes it was written with"
        )
    if loop.sharded:
        state = fsdp.load_sharded(checkpoints[-1], loop.ctx.rank, loop.model, loop.optimizer, loop.scheduler)
    else:
        state = load_checkpoint(checkpoints[-1], loop.model, loop.optimizer, loop.scheduler, loop.method)
    start_step = state["step"]
    loop.metrics.truncate_after(start_step)
    loop.last_good, loop.skipped = checkpoints[-1], state.get("skipped", 0)
    if loop.scaler is not None and state.get("scaler"):
        loop.scaler.load_state_dict(state["scaler"])  # the loss scale it had reached, not the initial 65536
    written = state.get("precision")
    if written and written != loop.precision.name:
        log(f"the checkpoint was written in precision {written}; this run continues in {loop.precision.name}")
    log(f"resumed from {checkpoints[-1]} (step {start_step})")
    return start_step


def evaluate_before(loop: _Loop, *, eval_rows: list[Example], start_step: int, log) -> EvalResult | None:
    """The untrained model's evaluation (the 'before' of a before/after comparison), on a fresh run only."""
    cfg = loop.cfg
    if not (eval_rows and start_step == 0 and loop.evaluates and cfg.train.eval_before):
        return None
    result = loop.evaluate(eval_rows)
    loop.metrics.write({"kind": "eval", "step": 0, **result.as_record()})
    log(result.describe("before training"))
    return result


def finish(loop: _Loop, *, result: RunResult, eval_rows: list[Example], log) -> None:
    """The final evaluation, the adapter (or trained weights), the loss plot; then the processes part."""
    out = result.output_dir
    if loop.evaluates and eval_rows:
        result.eval = loop.evaluate(eval_rows)
        loop.metrics.write({"kind": "eval", "step": loop.step, **result.eval.as_record()})
        log(result.eval.describe("after training"))
    values = fsdp.gathered_trainable(loop.model) if loop.sharded else None  # every rank takes part
    if loop.ctx.is_main:
        if loop.cfg.dpo.reference_adapter:
            _save_with_reference(loop.model, out, log)
        elif loop.sharded:
            loop.method.save(loop.model, out, values=values)
        else:
            loop.method.save(loop.model, out)
        plot_metrics(read_metrics(out / "metrics.jsonl"), out / "loss.png")
        log(f"adapter, config.yaml, metrics.jsonl and loss.png written to {out}")
    dist.barrier(loop.ctx)
    dist.teardown(loop.ctx)


def _save_with_reference(model: nn.Module, out: Path, log) -> None:
    """The run's adapter over a reference adapter: their exact sum (``combine`` cat, the ranks concatenated),
    so that it loads and deploys alone like any adapter."""
    combine(model, {REFERENCE: 1.0, TRAINED: 1.0}, "combined", "cat")
    try:
        save_adapter(model, out, "combined")
    finally:
        adapters.delete_adapter(model, "combined")
    log(f"{out}: the reference adapter plus the trained one, summed exactly (ranks concatenated)")


def lean_cpu_memory(cfg: RunConfig) -> bool:
    """Whether the run uses the lean allocator policy: as set, or by default when the run chose memory over
    speed (gradient checkpointing, a quantized base)."""
    if cfg.train.lean_cpu_memory is not None:
        return cfg.train.lean_cpu_memory
    return bool(cfg.train.gradient_checkpointing or cfg.quantize)


def _with_head(cfg: RunConfig, model: nn.Module, log) -> LoraConfig:
    """For classification, train the (freshly initialised) head whole: add it to modules_to_save."""
    lora = cfg.lora
    if cfg.task != "classification":
        return lora
    heads = [h for h in HEAD_NAMES if isinstance(getattr(model, h, None), nn.Module)]
    saved = list(lora.modules_to_save or [])
    missing = [h for h in heads if h not in saved]
    if missing:
        log(f"classification: training the head {', '.join(missing)} as modules_to_save")
        lora = dataclasses.replace(lora, modules_to_save=saved + missing)
    return lora


def _printer(enabled: bool):
    def log(message: str) -> None:
        if enabled:
            print(message, file=sys.stderr, flush=True)

    return log


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass(kw_only=True)
class _Loop:
    """The step loop and its bookkeeping (kept apart from setup so each part reads top to bottom)."""

    cfg: RunConfig
    ctx: dist.Context
    model: nn.Module  # the model whose parameters train (sharded under FSDP)
    wrapped: nn.Module  # what the steps call: the model, or its DDP wrapper
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rows: list[Example]
    metrics: MetricsLog
    ckpt_root: Path
    method: object
    step: int = 0
    skipped: int = 0
    step_rates: list[float] = field(default_factory=list)  # tokens per second of each step this process ran
    last_good: Path | None = None
    sharded: bool = False  # FSDP: every rank takes part in each forward, evaluations and saves included
    objective: object = None  # what a step minimises (lorakit.train.objectives); default: SFT
    precision: Precision = field(default_factory=lambda: decide("fp32", "cpu"))  # forwards under its context
    scaler: torch.amp.GradScaler | None = None  # fp16-mixed: scales the loss, skips steps whose gradients overflow
    stops: signals.StopRequests = field(default_factory=signals.StopRequests)  # SIGINT / SIGTERM received
    log: object = print  # prints on the main process only (``_printer``)

    def __post_init__(self) -> None:
        self.pad = pad_id(self.tokenizer)
        self.task = TASKS[self.cfg.task]
        self.objective = self.objective or objective_for(self.cfg)

    def evaluate(self, rows: list) -> EvalResult | PreferenceEval:
        """The held-out figures, computed as the steps compute (under the precision's autocast)."""
        cfg = self.cfg
        with self.precision.context(self.ctx.device):
            if self.objective.name != "sft":
                return evaluate_pairs(self.objective, self.model, rows, self.pad)
            return evaluate(
                self.model, self.tokenizer, rows, generate=cfg.train.generate_eval,
                max_new_tokens=cfg.train.max_new_tokens, task=self.task,
            )  # fmt: skip

    @property
    def evaluates(self) -> bool:
        """Whether this process runs the evaluations: rank 0, or every rank in step when the model is sharded
        (each forward gathers the shards); only rank 0 writes and prints the results."""
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
        bar = _progress_bar(t.max_steps, start_step, progress and self.ctx.is_main)
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
                  "tokens": tokens, "seconds": round(seconds, 4), "tokens_per_second": round(rate, 1), **stats}  # fmt: skip
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
            if self.evaluates:
                result = self.evaluate(eval_rows)
                self.metrics.write({"kind": "eval", "step": self.step, **result.as_record()})
                _printer(self.ctx.is_main)(f"\n{result.describe(f'at step {self.step}')}")
            dist.barrier(self.ctx)
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
        tmp = self.ckpt_root / f".tmp-{final.name}-sharded"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
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
        totals[-len(signals.HANDLED) :] = torch.tensor(
            self.stops.as_counts()
        )  # with the step's all-reduce: see ``run``
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
        _printer(self.ctx.is_main)(
            f"\nstep {self.step + 1}: the gradient norm is {value} at loss scale {scale:g}; step skipped by the "
            f"fp16 loss scaler, scale now {self.scaler.get_scale():g} ({self.skipped} skipped so far)"
        )

    def _non_finite(self, what: str, value: float) -> None:
        """A NaN or infinite loss or gradient: drop the update; skip the step (counted) or stop."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.train.nan_policy == "skip":
            self.skipped += 1
            self.scheduler.step()
            _printer(self.ctx.is_main)(
                f"\nstep {self.step + 1}: {what} is {value}; step skipped ({self.skipped} so far, train.nan_policy=skip)"
            )
            return
        where = f"; the last good checkpoint is {self.last_good}" if self.last_good else ""
        raise TrainingStopped(
            f"{what} became {value} at step {self.step + 1}: stopping{where}. Lower train.lr, enable "
            "train.max_grad_norm, or set train.nan_policy=skip"
        )


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
