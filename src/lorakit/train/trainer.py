"""A training run, set up top to bottom: one config in, a tested adapter out, on one process or many (torchrun +
DDP or FSDP). The steps themselves are ``lorakit.train.loop``; the data ``run_data``; the optimizer ``optim``.

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

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from .. import adapters, durable
from ..combine import combine
from ..config import LoraConfig
from ..data import DataStats, Example
from ..fastpath import return_freed_memory_to_os
from ..io import load_adapter, save_adapter
from ..layers import fuse_forwards
from ..methods.lora import LoraMethod
from ..models import load_model, resolve_model_dir
from ..precision import Precision
from ..quant import is_quantized, load_quantized, quantize
from ..state import registry
from ..targeting import HEAD_NAMES
from . import distributed as dist
from . import fsdp, signals
from .checkpoint import list_checkpoints, load_checkpoint
from .config import RunConfig
from .evaluate import EvalResult
from .loop import Loop, TrainingStopped, printer
from .metrics import MetricsLog, RunStatus, plot_metrics, read_metrics
from .objectives import REFERENCE, TRAINED, PreferenceEval, disable_dropout, objective_for
from .objectives import precompute_reference as precompute_reference_logps
from .optim import build_optimizer
from .outdir import check_output_dir
from .retention import load_probes, load_texts, measure_retention
from .run_data import check_data_files, prepare_data, with_epoch_steps
from .run_precision import adapter_dtype, cast_trainable, decide_precision, grad_scaler, precision_record
from .trackers import open_trackers

__all__ = ["RunResult", "TrainingStopped", "train"]


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


def train(cfg: RunConfig, resume: bool = False, progress: bool = True, method=None) -> RunResult:
    """Run the training described by ``cfg``; see the module docstring for the loss normalisation.

    ``method`` (see ``lorakit.methods``) decides what trains; the default is LoRA with ``cfg.lora``. The steps
    below read top to bottom: output directory, model, data, method, optimizer, resume, loop, finish.
    """
    started = time.perf_counter()
    ctx = dist.setup(cfg.device)
    log = printer(ctx.is_main)
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
    check_data_files(cfg)  # before the model loads: a wrong path should not cost a model load to learn
    log(precision.describe())
    record = precision_record(precision)
    status.precision, status.precision_reason = record["precision"], record["reason"]
    _seed(cfg.seed)
    model, tokenizer = setup_model(cfg, ctx=ctx, precision=precision, log=log)
    train_rows, eval_rows, stats = setup_data(cfg, tokenizer=tokenizer, model=model, ctx=ctx, log=log)
    cfg = with_epoch_steps(cfg, len(train_rows), log)
    status.max_steps = cfg.train.max_steps
    status.set("running")
    model, method = setup_method(cfg, model=model, method=method, ctx=ctx, log=log, precision=precision)
    optimizer, scheduler = build_optimizer(model, cfg)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=ctx.is_main)
    loop = Loop(
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


def _run(loop: Loop, *, out: Path, stats, eval_rows, start_step: int, progress: bool, log) -> RunResult:
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
            if (target := out / name).exists() or target.is_symlink():
                durable.delete(target)  # each gone at once (renamed aside first), never half
    try:
        out.mkdir(parents=True, exist_ok=True)
        durable.write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as err:
        raise ValueError(
            f"output_dir {out} is not writable ({err.strerror or err}); choose a directory you can write to "
            "or fix its permissions"
        ) from None
    return out


def sharded(cfg: RunConfig, ctx: dist.Context) -> bool:
    """Whether this run shards the model across processes (FSDP)."""
    return cfg.train.strategy == "fsdp" and ctx.distributed


def setup_model(
    cfg: RunConfig, *, ctx: dist.Context | None = None, precision: Precision | None = None, log=print
) -> tuple[nn.Module, object]:
    """The base model and its tokenizer, stored in ``precision.storage`` (default: float32); with ``quantize``,
    its linear layers quantized while loading (``lorakit.quant.load_quantized``). Under FSDP every rank builds
    only the skeleton (parameters on the meta device) and reads its shards of the weights in ``setup_method``."""
    skeleton = ctx is not None and sharded(cfg, ctx)
    if skeleton and not any(resolve_model_dir(cfg.model).glob("*.safetensors")):
        raise ValueError(
            f"train.strategy=fsdp reads each process's shards from the model's safetensors files, and "
            f"{resolve_model_dir(cfg.model)} has none: save the model with save_pretrained(safe_serialization=True), "
            "or use train.strategy=ddp"
        )
    dtype = precision.storage if precision is not None else torch.float32
    if cfg.quantize:  # quantized while loading, a layer at a time: never the whole model in a float dtype
        device = ctx.device if ctx is not None else "cpu"
        model, tokenizer, report = load_quantized(
            cfg.model,
            cfg.quantize,
            task=cfg.task,
            dtype=dtype,
            compute_dtype=dtype,
            device=device,
            attention=_attention(cfg),
            log=log,
        )
        log(report.describe())
    else:
        model, tokenizer = load_model(
            cfg.model, task=cfg.task, dtype=dtype, skeleton=skeleton, attention=_attention(cfg)
        )
    if tokenizer is None:
        raise ValueError(f"model {cfg.model} has no tokenizer files; training needs one")
    return model, tokenizer


def _attention(cfg: RunConfig) -> str | None:
    return None if cfg.attention == "auto" else cfg.attention


def setup_data(
    cfg: RunConfig, *, tokenizer, model: nn.Module, ctx: dist.Context, log
) -> tuple[list[Example], list[Example], dict[str, DataStats]]:
    """Training and held-out rows, tokenized; the batch size checked against the processes."""
    train_rows, eval_rows, stats = prepare_data(cfg, tokenizer, model.config, log=log)
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


def setup_method(
    cfg: RunConfig, *, model: nn.Module, method, ctx: dist.Context, log, precision: Precision | None = None
) -> tuple[nn.Module, object]:
    """The model on its device, quantized and checkpointed as configured, with the method's trainable parts in
    ``precision.trained`` (float32 for the mixed precisions; default: as created); under FSDP, sharded, each
    rank holding its shards of the weights and of the initial adapter."""
    if not any(p.is_meta for p in model.parameters()):  # a skeleton gets its memory when sharded, below
        model = model.to(ctx.device)
    if cfg.quantize and not any(is_quantized(m) for m in model.modules()):  # a model setup_model did not load
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


def setup_resume(loop: Loop, *, resume: bool, log) -> int:
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


def evaluate_before(loop: Loop, *, eval_rows: list[Example], start_step: int, log) -> EvalResult | None:
    """The untrained model's evaluation (the 'before' of a before/after comparison), on a fresh run only; every
    process scores its share of the rows (``Loop.evaluate``), the main one writes and prints the figures."""
    cfg = loop.cfg
    if not (eval_rows and start_step == 0 and cfg.train.eval_before):
        return None
    result = loop.evaluate(eval_rows)
    loop.metrics.write({"kind": "eval", "step": 0, **result.as_record()})
    log(result.describe("before training"))
    return result


def finish(loop: Loop, *, result: RunResult, eval_rows: list[Example], log) -> None:
    """The final evaluation, the adapter (or trained weights), the loss plot; then the processes part."""
    out = result.output_dir
    if eval_rows:  # every process its share of the rows (Loop.evaluate)
        result.eval = loop.evaluate(eval_rows)
        loop.metrics.write({"kind": "eval", "step": loop.step, **result.eval.as_record()})
        log(result.eval.describe("after training"))
    if loop.cfg.train.eval_retention:
        _retention(loop, log)
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


def _retention(loop: Loop, log) -> None:
    """train.eval_retention: what the trained model kept of its base's general behaviour (``retention``), the base
    being the same model with its adapters off; written to metrics.jsonl (kind ``retention``) and printed. Under
    FSDP every rank takes part in the forwards; otherwise the main process measures alone."""
    if not (loop.sharded or loop.ctx.is_main):
        return
    cfg = loop.cfg
    texts, probes = load_texts(cfg.data.retention_texts), load_probes(cfg.data.retention_probes)
    with loop.precision.context(loop.ctx.device):
        report = measure_retention(None, loop.model, loop.tokenizer, texts, probes, progress=False)
    loop.metrics.write({"kind": "retention", "step": loop.step, **report.as_record()})
    log(report.summary())


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


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
