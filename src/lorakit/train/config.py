"""The training run's YAML config: documented dataclasses, --set overrides, helpful errors."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from .._bnb import QUANT_METHODS
from ..config import BIAS_MODES, INIT_METHODS, LoraConfig
from ..data import PACKING_STRATEGIES
from ..models import TASK_NAMES
from ..precision import PRECISIONS

SCHEDULERS = ("constant", "linear", "cosine")
STRATEGIES = ("ddp", "fsdp")
OBJECTIVES = ("sft", "dpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo")
REPORTERS = ("tensorboard", "mlflow", "wandb")
NAN_POLICIES = ("stop", "skip")
CHOICES = {  # keys whose value is one of a fixed set (the dashboard's form shows them as menus)
    "objective": OBJECTIVES, "task": TASK_NAMES, "precision": PRECISIONS, "quantize": QUANT_METHODS,
    "lora.bias": BIAS_MODES, "lora.init": tuple(INIT_METHODS), "train.scheduler": SCHEDULERS,
    "train.strategy": STRATEGIES, "train.nan_policy": NAN_POLICIES, "dpo.loss_type": DPO_LOSSES,
    "data.packing_strategy": PACKING_STRATEGIES,
}  # fmt: skip


@dataclass
class DataConfig:
    train: str = ""
    """Training data: a .jsonl, .csv or .parquet file, or a directory saved by Hugging Face `datasets`.
    Rows hold `text`, or `prompt` + `completion`, or chat `messages` (a list of {role, content}). A relative
    path in a config file is relative to that file's directory (given with --set: to the working directory)."""

    eval: str | None = None
    """Evaluation data in the same formats (a relative path: as for train). If unset, `eval_fraction` of the
    training rows is held out."""

    eval_fraction: float = 0.0
    """Share of the training rows held out for evaluation when `eval` is unset (0 = no evaluation)."""

    max_length: int = 512
    """Rows longer than this many tokens are truncated (the count is reported)."""

    completion_only: bool = True
    """Loss on the completion / assistant turns only, for prompt+completion and chat rows."""

    packing: bool = False
    """Place whole rows into sequences of up to max_length tokens (see packing_strategy; fewer pad tokens; causal-lm).
    Positions restart at each row and attention stays inside it (a block-diagonal mask of batch x max_length^2
    booleans under sdpa attention, floats of the model's dtype under eager), so the loss and gradients are those
    of the rows run one by one; train.batch_size counts sequences."""

    packing_strategy: str = "bfd"
    """With packing: bfd (best-fit decreasing: longest rows first, each into the fullest sequence it fits;
    sequences come out nearly full) or in_order (rows in the data's order, a new sequence when the next one does
    not fit)."""

    max_eval_rows: int | None = None
    """Evaluate on at most this many rows (the first ones); unset: all."""


@dataclass
class TrainLoopConfig:
    max_steps: int = 100
    """Optimizer steps to run (unless epochs is set)."""

    epochs: float | None = None
    """Passes over the training data; when set, the run's max_steps is ceil(epochs x training rows (sequences,
    with packing) / batch_size), computed after the data is read. Setting both epochs and max_steps is an error."""

    batch_size: int = 8
    """Rows per optimizer step across all processes (global batch), before gradient accumulation splits it."""

    grad_accum: int = 1
    """Split each step's batch into this many micro-batches (same result, less memory)."""

    lr: float = 2e-4
    """Peak learning rate of AdamW."""

    scheduler: str = "cosine"
    """Learning-rate schedule after warmup: constant, linear (to 0) or cosine (to 0)."""

    warmup_steps: int = 0
    """Steps of linear warmup from 0 to `lr`."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; unset: no clipping."""

    loraplus_lr_ratio: float | None = None
    """LoRA+: learning rate of the B matrices = lr * this ratio (16 is typical); unset: same lr for A and B."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""

    fused_forwards: bool = True
    """Give LLaMA-style gated MLPs and RMS norms lorakit's fused training forwards (same maths, fewer saved
    activations: ``lorakit.fuse_forwards``); false: the model's own forwards."""

    lean_cpu_memory: bool | None = None
    """On Linux CPU: return freed activations to the OS at once (lower peak RSS, about 10 % slower steps).
    Unset: on when gradient_checkpointing or quantize is set (runs that chose memory over speed), else off."""

    log_every: int = 10
    """Without a progress bar (--no-progress, or output not a terminal): print one line every N steps (step, loss,
    lr, tokens/s); 0: none."""

    eval_every: int = 0
    """Evaluate every N steps (and at the end); 0: only at the end."""

    save_every: int = 0
    """Write a checkpoint every N steps; 0: only the final adapter."""

    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted)."""

    generate_eval: bool = True
    """At evaluation, also greedy-generate answers and report exact-match accuracy (rows with a reference)."""

    max_new_tokens: int = 32
    """Token limit for generated answers at evaluation."""

    nan_policy: str = "stop"
    """On a NaN or infinite loss or gradient: stop (keep the last good checkpoint) or skip (drop the step, count it)."""

    eval_before: bool = True
    """Evaluate the untrained model first (the 'before' of a before/after comparison)."""

    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also receive every metrics record: any of tensorboard (event files in
    output_dir/tensorboard), mlflow (a run in tracking_uri), wandb (offline unless WANDB_MODE says otherwise),
    each an optional extra (pip install 'lorakit[tensorboard]', ...). A resumed run continues the same runs."""

    tracking_uri: str | None = None
    """MLflow tracking URI (a server, or sqlite:///FILE); unset: a SQLite store of the run's own,
    output_dir/mlflow.db, with the artifacts in output_dir/mlartifacts."""

    project: str = "lorakit"
    """MLflow experiment and W&B project name."""

    strategy: str = "ddp"
    """Under torchrun: ddp (every process holds the whole model) or fsdp (PyTorch's FSDP2: the base and the
    adapters sharded across processes, per transformer block; each process reads only its shards of the
    weights). Ignored in a single process."""


@dataclass
class DpoConfig:
    beta: float = 0.1
    """objective=dpo: DPO's beta, how far the trained model may move from the reference (larger: closer); for
    loss_type=ipo the regularisation tau. objective=orpo: the weight lambda of the odds-ratio term."""

    loss_type: str = "sigmoid"
    """objective=dpo: sigmoid (the DPO paper's loss, -log sigmoid(beta x margin)) or ipo (IPO's squared loss on
    the per-token margin)."""

    sft_weight: float = 0.0
    """objective=dpo: add this weight times the chosen answers' mean token NLL to the loss (RPO; TRL's loss_type
    [sigmoid, sft] with loss_weights [1, weight]): DPO alone may lower the rejected answers more than it raises
    the chosen ones; this keeps the chosen ones likely. 0: plain DPO."""

    label_smoothing: float = 0.0
    """loss_type=sigmoid: the assumed share of flipped preference labels, in [0, 0.5) (conservative DPO); 0: the
    plain DPO loss."""

    reference_adapter: str | None = None
    """objective=dpo: an adapter directory (an SFT adapter, say; a relative path: as for data.train) loaded
    frozen beside the trained adapter. The reference model is the base with it, the trained model the base with
    both; the run's adapter is then their exact sum (ranks concatenated). Unset: the reference is the base model
    (the trained adapter off)."""

    precompute_reference: bool = False
    """objective=dpo: compute the reference log-probabilities of every training pair once before the first
    step (one forward pass over the data) instead of at every step."""

    disable_dropout: bool = True
    """objective=dpo or orpo: set every dropout probability to 0 for the run (lora_dropout included), so that
    the trained and the reference model score a sequence alike and the log-probabilities are exact."""


@dataclass
class CompareConfig:
    methods: list[str] = field(default_factory=lambda: ["full", "adapter", "prompt", "lora"])
    """Methods `lorakit compare` runs, in order: full, adapter (bottleneck layers), prompt (prompt tuning), lora."""

    lr_full: float = 5e-5
    """Learning rate for full fine-tuning (every weight moves, so it needs a small one)."""

    lr_adapter: float = 2e-3
    """Learning rate for bottleneck adapter layers."""

    lr_prompt: float = 3e-2
    """Learning rate for prompt tuning (soft prompts need large steps)."""

    lr_lora: float | None = None
    """Learning rate for LoRA; unset: train.lr."""

    adapter_size: int = 64
    """Bottleneck width m of the adapter layers (down: d -> m, up: m -> d)."""

    prompt_length: int = 20
    """Number of soft-prompt embeddings for prompt tuning."""

    prompt_init_text: str = "Write the date as YYYY-MM-DD."
    """Text whose token embeddings (repeated to prompt_length) initialise the soft prompt."""

    latency_repeats: int = 5
    """Forward passes timed per model for the inference-latency column (median reported)."""


@dataclass
class RunConfig:
    model: str = "default"
    """Base model: a local Hugging Face directory, a .gguf file, or `default` (embedded SmolLM2-135M-Instruct).
    A relative path that exists beside the config file is read from there, else from the working directory."""

    objective: str = "sft"
    """sft (supervised fine-tuning on the rows' completions); dpo (preference tuning against a frozen reference)
    or orpo (reference-free: the SFT loss plus an odds-ratio term) on rows {prompt, chosen, rejected}; see the
    dpo section."""

    task: str = "causal-lm"
    """causal-lm; seq2seq (T5 family: prompt/completion rows); classification (BERT family: text + label rows,
    the head is trained whole as modules_to_save)."""

    precision: str = "auto"
    """What the run stores and computes in: fp32 (everything float32); bf16-mixed (the frozen base stored in
    bfloat16, adapters, trained biases, modules_to_save and optimizer state in float32, forward and backward under
    torch.autocast bf16; the saved adapter is float32); bf16 (everything bfloat16, adapters and optimizer state
    included: the least memory, but small updates round away); fp16-mixed (as bf16-mixed with float16 and loss
    scaling, steps with infinite gradients skipped and counted; CUDA only). auto: bf16-mixed on a CUDA GPU with
    bf16 support and on a CPU with native bf16 matrix instructions (AMX or AVX-512 BF16), fp32 elsewhere (a CPU
    without them emulates bf16, slower than float32). The run prints its choice and the reason and records them
    in status.json and metrics.jsonl; config.yaml keeps auto, so a rerun decides again on its machine."""

    quantize: str | None = None
    """QLoRA: store the frozen base linear weights (all but the output head) as nf4, fp4 or int8 with
    bitsandbytes (`pip install 'bitsandbytes>=0.50'`); the rest of the base is stored and the quantized layers
    compute as precision says (bfloat16 under bf16-mixed and bf16), the adapters train in precision's trained
    dtype (float32 under the mixed precisions). Unset: no quantization."""

    output_dir: str = "out/run"
    """Where the adapter, resolved config, metrics, plot and checkpoints go. A relative path is relative to the
    working directory (as transformers' and TRL's output_dir), not to the config file; data paths are read
    against the config file's directory."""

    overwrite: bool = False
    """Allow writing into an existing output directory that holds a finished run."""

    seed: int = 0
    """Seed for initialisation, data order and dropout."""

    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def __post_init__(self) -> None:
        check_run(self)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what output_dir/config.yaml holds), loadable again: with train.epochs set,
        train.max_steps is left out (it follows from the data, and a file may not set both)."""
        data = dataclasses.asdict(self)
        if self.train.epochs is not None:
            del data["train"]["max_steps"]
        return data


def check_run(c: RunConfig) -> None:
    """Cross-field checks; each error names the key to change."""
    checks = [
        (c.task in TASK_NAMES, f"task={c.task!r}: use one of {list(TASK_NAMES)}"),
        (c.precision in PRECISIONS, f"precision={c.precision!r}: use one of {', '.join(PRECISIONS)}"),
        (
            c.quantize is None or c.quantize in QUANT_METHODS,
            f"quantize={c.quantize!r}: use {', '.join(QUANT_METHODS[:-1])} or {QUANT_METHODS[-1]}, or leave it unset "
            "for a float base",
        ),
        (0 <= c.data.eval_fraction < 1, f"data.eval_fraction={c.data.eval_fraction}: use 0 <= value < 1"),
        (c.data.max_length >= 8, f"data.max_length={c.data.max_length}: use at least 8"),
        (
            c.data.packing_strategy in PACKING_STRATEGIES,
            f"data.packing_strategy={c.data.packing_strategy!r}: use one of {list(PACKING_STRATEGIES)}",
        ),
        (c.train.max_steps >= 1, f"train.max_steps={c.train.max_steps}: use at least 1"),
        (
            c.train.epochs is None or (math.isfinite(c.train.epochs) and c.train.epochs > 0),
            f"train.epochs={c.train.epochs}: use a positive number of passes (1, 3, 0.5, ...), or leave it unset",
        ),
        (c.train.log_every >= 0, f"train.log_every={c.train.log_every}: use 0 (no log lines) or more"),
        (c.train.batch_size >= 1, f"train.batch_size={c.train.batch_size}: use at least 1"),
        (c.train.grad_accum >= 1, f"train.grad_accum={c.train.grad_accum}: use at least 1"),
        (
            c.train.batch_size % c.train.grad_accum == 0,
            f"train.batch_size={c.train.batch_size} is not divisible by train.grad_accum={c.train.grad_accum}",
        ),
        (c.train.lr > 0, f"train.lr={c.train.lr}: use a positive learning rate"),
        (c.train.scheduler in SCHEDULERS, f"train.scheduler={c.train.scheduler!r}: use one of {list(SCHEDULERS)}"),
        (c.train.warmup_steps >= 0, f"train.warmup_steps={c.train.warmup_steps}: use 0 or more"),
        (c.train.keep_last >= 1, f"train.keep_last={c.train.keep_last}: keep at least 1 checkpoint"),
        (c.train.nan_policy in NAN_POLICIES, f"train.nan_policy={c.train.nan_policy!r}: use stop or skip"),
        (
            c.train.loraplus_lr_ratio is None or c.train.loraplus_lr_ratio > 0,
            f"train.loraplus_lr_ratio={c.train.loraplus_lr_ratio}: use a positive ratio or leave it unset",
        ),
        (c.train.strategy in STRATEGIES, f"train.strategy={c.train.strategy!r}: use one of {list(STRATEGIES)}"),
        (
            all(r in REPORTERS for r in c.train.report_to) and len(set(c.train.report_to)) == len(c.train.report_to),
            f"train.report_to={c.train.report_to!r}: list each of {list(REPORTERS)} at most once, e.g. "
            "[tensorboard, mlflow]",
        ),
        (
            c.train.strategy != "fsdp" or c.quantize is None,
            f"train.strategy=fsdp with quantize={c.quantize}: FSDP cannot shard bitsandbytes' quantized weights "
            "(they are packed bytes with separate scales); use train.strategy=ddp for QLoRA, or leave quantize unset",
        ),
        (
            c.train.strategy != "fsdp" or c.precision != "fp16-mixed",
            "train.strategy=fsdp with precision=fp16-mixed: the loss scaler's overflow check would differ between "
            "the shards; use precision=bf16-mixed (or auto), or train.strategy=ddp",
        ),
        (
            c.train.strategy != "fsdp" or c.lora.init != "pissa",
            "train.strategy=fsdp with lora.init=pissa: saving a PiSSA adapter needs the whole base weights in one "
            "process; use train.strategy=ddp, or another lora.init",
        ),
    ]
    checks += _preference_checks(c)
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _preference_checks(c: RunConfig) -> list[tuple[bool, str]]:
    d, preference = c.dpo, c.objective in ("dpo", "orpo")
    return [
        (c.objective in OBJECTIVES, f"objective={c.objective!r}: use one of {list(OBJECTIVES)}"),
        (d.beta > 0, f"dpo.beta={d.beta}: use a positive value (0.1 is usual)"),
        (d.loss_type in DPO_LOSSES, f"dpo.loss_type={d.loss_type!r}: use one of {list(DPO_LOSSES)}"),
        (0 <= d.label_smoothing < 0.5, f"dpo.label_smoothing={d.label_smoothing}: use 0 <= value < 0.5"),
        (d.sft_weight >= 0, f"dpo.sft_weight={d.sft_weight}: use 0 (plain DPO) or a positive weight"),
        (
            d.label_smoothing == 0 or d.loss_type == "sigmoid",
            f"dpo.label_smoothing={d.label_smoothing} applies to loss_type=sigmoid, not {d.loss_type}; set it to 0",
        ),
        (
            not preference or c.task == "causal-lm",
            f"objective={c.objective} trains causal language models; task={c.task!r} is not one: use task=causal-lm",
        ),
        (
            not preference or not c.data.packing,
            f"objective={c.objective} scores each answer as one sequence; set data.packing=false",
        ),
        (
            c.objective == "dpo" or (d.reference_adapter is None and not d.precompute_reference and not d.sft_weight),
            f"dpo.reference_adapter, dpo.precompute_reference and dpo.sft_weight need objective=dpo (objective="
            f"{c.objective} has no reference model, and orpo its own NLL term); unset them",
        ),
        (
            d.reference_adapter is None or c.train.strategy != "fsdp",
            "dpo.reference_adapter with train.strategy=fsdp: the combined adapter is built in one process; use "
            "train.strategy=ddp",
        ),
    ]


# ----- building from YAML / dicts ------------------------------------------------------------------------
PATH_KEYS = ("data.train", "data.eval", "dpo.reference_adapter")
"""Keys holding paths the run reads. A relative one is read against the config file's directory when written in
the file, against the working directory when given with --set; either way it is stored absolute, so the
config.yaml a run writes works from any directory. ``model`` follows the rule only where such a path exists
(it may also be ``default`` or a Hub id); ``output_dir`` stays relative to the working directory."""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config file (or start from defaults), apply ``key.sub=value`` overrides, validate.

    Relative paths (``PATH_KEYS``, and ``model`` where it names an existing path) become absolute: those in the
    file against the file's directory, those of overrides against the working directory."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = _read_yaml(path)
        resolve_paths(data, path.parent)
    for item in overrides:
        key = apply_override(data, item)
        resolve_paths(data, Path.cwd(), under=key)
    return from_dict(RunConfig, data, "")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of keys to values")
    return data


def resolve_paths(data: dict[str, Any], base: Path, under: str = "") -> None:
    """Make the relative paths of ``data`` absolute against ``base``, in place: the ``PATH_KEYS`` (and ``model``
    where ``base / model`` exists) at or below the dotted key ``under`` ("": all). Other values are left alone."""
    for key in (*PATH_KEYS, "model"):
        if under and key != under and not key.startswith(under + "."):
            continue
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        value = node.get(name) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value.strip():
            continue
        if key == "model" and (value == "default" or not (base / Path(value).expanduser()).exists()):
            continue  # the embedded model, a Hub id, or a path relative to the working directory
        node[name] = absolute_path(value, base)


def absolute_path(value: str, base: Path) -> str:
    """``value`` (``~`` expanded) if absolute, else ``base / value``, absolute and normalised (no ``..``)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    return os.path.abspath(base / path)


def apply_override(data: dict[str, Any], item: str) -> str:
    """Apply one ``key.sub=value`` (the value read as YAML) to ``data``, in place; returns the dotted key."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: write it as key=value, for example --set train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {part} is not a section")
    node[parts[-1]] = value
    return key.strip()


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    """``cls`` built from the nested mapping ``data`` (``prefix``: the dotted path to it, "" at the top). Every
    unknown key of the whole mapping is reported at once; a section's missing keys take its defaults."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {data!r}")
    unknown = unknown_keys(cls, data, prefix)
    if unknown:
        raise ValueError(unknown_keys_message(unknown))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{key} must be a mapping of keys to values, got {value!r}")
            value = _check_exclusive(value, f"{prefix}{key}.")
            default = fields[key].default_factory()  # documented defaults of the section, then the user's keys
            merged = {f.name: getattr(default, f.name) for f in dataclasses.fields(hint)} | value
            kwargs[key] = from_dict(hint, merged, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}" if prefix else str(err)) from None


EXCLUSIVE = {"train.": ("epochs", "max_steps")}
"""Pairs of section keys a config may not both set (checked on the keys the user gave, before the defaults)."""


def _check_exclusive(given: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The section's keys without those of an exclusive pair set to null (``--set train.max_steps=null`` drops
    a max_steps of the file, so that train.epochs may take its place); both set is an error."""
    pair = EXCLUSIVE.get(prefix, ())
    given = {k: v for k, v in given.items() if not (k in pair and v is None)}
    if pair and all(k in given for k in pair):
        a, b = (prefix + k for k in pair)
        raise ValueError(
            f"{a}={given[pair[0]]!r} and {b}={given[pair[1]]!r} are both set: keep one ({a}: passes over the "
            f"training data; {b}: optimizer steps); on the command line, --set {a}=null or --set {b}=null drops one"
        )
    return given


def steps_for_epochs(epochs: float, rows: int, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``rows`` training rows (sequences, with packing) at
    ``batch_size`` rows a step: ceil(epochs x rows / batch_size), at least 1. ``epochs`` is taken as the
    decimal it was written as (0.1 x 30 rows / 1 is 3 steps, not 4)."""
    if not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"train.epochs={epochs}: use a positive number of passes")
    if rows < 1 or batch_size < 1:
        raise ValueError(f"steps_for_epochs needs rows >= 1 and batch_size >= 1, got {rows} and {batch_size}")
    return max(1, math.ceil(Fraction(repr(float(epochs))) * rows / batch_size))


# ----- unknown keys: what people bring from other trainers ---------------------------------------------------
ALIASES: dict[str, tuple[str, str]] = {
    # name -> (lorakit key, whose name it is), or (a sentence, whose name it is) where no key is the same
    "learning_rate": ("train.lr", "transformers' learning_rate"),
    "num_train_epochs": ("train.epochs", "transformers' num_train_epochs"),
    "num_epochs": ("train.epochs", "axolotl's num_epochs"),
    "per_device_train_batch_size": (
        "lorakit's train.batch_size is the global batch (rows per optimizer step, all processes together), split "
        "into train.grad_accum micro-batches: set train.batch_size = per-device batch x gradient accumulation x "
        "processes",
        "transformers' per_device_train_batch_size",
    ),
    "micro_batch_size": (
        "lorakit's train.batch_size is the global batch (rows per optimizer step, all processes together), split "
        "into train.grad_accum micro-batches: set train.batch_size = micro_batch_size x train.grad_accum x "
        "processes",
        "axolotl's micro_batch_size",
    ),
    "gradient_accumulation_steps": ("train.grad_accum", "transformers' gradient_accumulation_steps"),
    "warmup_ratio": (
        "lorakit counts warmup in steps: set train.warmup_steps (ratio x train.max_steps)",
        "transformers' warmup_ratio",
    ),
    "lr_scheduler_type": ("train.scheduler", "transformers' lr_scheduler_type"),
    "lr_scheduler": ("train.scheduler", "axolotl's lr_scheduler"),
    "optim": (
        "lorakit trains with AdamW (train.lr, train.weight_decay); there is no optimizer key",
        "transformers' optim",
    ),
    "eval_steps": ("train.eval_every", "transformers' eval_steps"),
    "save_steps": ("train.save_every", "transformers' save_steps"),
    "save_total_limit": ("train.keep_last", "transformers' save_total_limit"),
    "logging_steps": ("train.log_every", "transformers' logging_steps"),
    "lora_r": ("lora.r", "axolotl's lora_r"),
    "rank": ("lora.r", "the LoRA rank"),
    "lora_alpha": ("lora.alpha", "PEFT's lora_alpha"),
    "lora_dropout": ("lora.dropout", "PEFT's lora_dropout"),
    "lora_target_modules": ("lora.target_modules", "axolotl's lora_target_modules"),
    "lora_target_linear": ("lorakit writes it lora.target_modules: all-linear", "axolotl's lora_target_linear"),
    "max_seq_length": ("data.max_length", "TRL's max_seq_length"),
    "sequence_len": ("data.max_length", "axolotl's sequence_len"),
    "completion_only_loss": ("data.completion_only", "TRL's completion_only_loss"),
    "train_on_inputs": (
        "lorakit's data.completion_only is its opposite (true: loss on the completions only)",
        "axolotl's train_on_inputs",
    ),
    "bf16": ("lorakit sets the precision with one key: write `precision: bf16-mixed`", "transformers' bf16"),
    "fp16": ("lorakit sets the precision with one key: write `precision: fp16-mixed`", "transformers' fp16"),
    "torch_dtype": ("precision", "transformers' torch_dtype"),
    "mixed_precision": ("precision", "accelerate's mixed_precision"),
    "dtype": (
        "dtype is replaced by precision: bf16 (everything bf16) or bf16-mixed (float32 adapters under autocast); "
        "float32 -> fp32; float16 -> fp16-mixed (CUDA)",
        "lorakit's former key",
    ),
    "load_in_4bit": ("lorakit writes it `quantize: nf4` (or fp4)", "transformers' load_in_4bit"),
    "load_in_8bit": ("lorakit writes it `quantize: int8`", "transformers' load_in_8bit"),
    "model_name_or_path": ("model", "transformers' model_name_or_path"),
    "base_model": ("model", "axolotl's base_model"),
    "dataset": ("data.train", "a local .jsonl, .csv, .parquet file or saved dataset"),
    "dataset_name": ("data.train", "TRL's dataset_name; lorakit reads local files, not Hub datasets"),
    "datasets": ("data.train", "axolotl's datasets"),
    "train_file": ("data.train", "transformers' train_file"),
    "validation_file": ("data.eval", "transformers' validation_file"),
}
"""Names from transformers' TrainingArguments, TRL's configs, PEFT's LoraConfig and axolotl, with lorakit's key
(or what to write instead). Names lorakit shares (warmup_steps, weight_decay, max_grad_norm, seed, output_dir,
packing, beta, report_to, max_steps, max_length, epochs, ...) need no entry: in the wrong section they are
pointed to their own (``unknown_keys_message``)."""

SECTION_CUTOFF = 0.66  # close-match ratio within the key's own section ('rr' -> 'r', not 'learning_rate' ->
ELSEWHERE_CUTOFF = 0.85  # 'tracking_uri'); a key of another section or an alias must be nearly the same word


def unknown_keys(cls: type, data: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
    """(dotted key, dotted section) of every key of ``data`` (and its sections, recursively) that ``cls`` lacks."""
    hints = typing.get_type_hints(cls)
    found = []
    for key, value in data.items():
        if key not in hints:
            found.append((prefix + str(key), prefix.rstrip(".")))
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            found += unknown_keys(hints[key], value, f"{prefix}{key}.")
    return found


def unknown_keys_message(unknown: list[tuple[str, str]]) -> str:
    """One line per unknown key with its suggestion, then the valid keys of each section involved."""
    lines = [f"unknown config key {key!r}{_suggestion(key, section)}" for key, section in unknown]
    for section in dict.fromkeys(section for _, section in unknown):
        names = ", ".join(_section_names(section))
        lines.append(f"Valid keys in {section}: {names}" if section else f"Valid top-level keys: {names}")
    return "\n".join(lines)


def _suggestion(key: str, section: str) -> str:
    """The text after the key: lorakit's name for it, or the key it is closest to, or nothing."""
    name = key.rsplit(".", 1)[-1]
    plain = name.lower().replace("-", "_")
    elsewhere = [k for k in all_keys() if k.rsplit(".", 1)[-1] == plain and k.rpartition(".")[0] != section]
    if elsewhere:
        home = elsewhere[0].rpartition(".")[0]
        return (
            f". Did you mean {elsewhere[0]!r}? ({plain} is {f'in the {home} section' if home else 'a top-level key'})"
        )
    if plain in ALIASES:
        target, source = ALIASES[plain]
        return f": lorakit calls it {target!r} ({source})" if _is_key(target) else f": {target} ({source})"
    close = difflib.get_close_matches(plain, _section_names(section), n=1, cutoff=SECTION_CUTOFF)
    if close:
        return f". Did you mean {(section + '.' if section else '') + close[0]!r}?"
    return _distant_suggestion(plain)


def _distant_suggestion(name: str) -> str:
    """A near-identical alias or key of another section ('lerning_rate' -> train.lr), else nothing."""
    alias = difflib.get_close_matches(name, list(ALIASES), n=1, cutoff=ELSEWHERE_CUTOFF)
    if alias and _is_key(ALIASES[alias[0]][0]):
        target, source = ALIASES[alias[0]]
        return f". Did you mean {target!r}? ({source})"
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(all_keys())}
    close = difflib.get_close_matches(name, list(leaves), n=1, cutoff=ELSEWHERE_CUTOFF)
    return f". Did you mean {leaves[close[0]]!r}?" if close else ""


def _is_key(text: str) -> bool:
    return text in all_keys()


def _section_names(section: str) -> list[str]:
    """The key names of a section ("": the top level, sections included), in documentation order."""
    cls = RunConfig
    for part in filter(None, section.split(".")):
        cls = typing.get_type_hints(cls)[part]
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Light type checks: ints where ints are due (floats accepted for float fields), etc."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{key} cannot be empty")
    for option in options:
        base = typing.get_origin(option) or option
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        if base is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        if base in (list, dict) and isinstance(value, base):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ValueError(f"{key}={value!r} has the wrong type: expected {names}")


# ----- documentation -----------------------------------------------------------------------------------
@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string right after each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
        if is_field and is_doc:
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field, in order: the config reference."""
    rows = []
    defaults = cls()
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(
                (f"{prefix}{f.name}.{k}", getattr(value, k.split(".")[-1], d), h)
                for k, d, h in reference(hints[f.name], "")
            )
        else:
            rows.append((prefix + f.name, value, docs.get(f.name, "")))
    return rows


def field_kind(key: str) -> tuple[str, bool]:
    """What a key holds, for forms: (bool | int | float | str | choice | yaml, whether it may be unset).
    ``yaml`` marks lists, mappings and mixed types, written as YAML (as with --set)."""
    cls, *path = [RunConfig, *key.split(".")]
    for part in path[:-1]:
        cls = typing.get_type_hints(cls)[part]
    hint = typing.get_type_hints(cls)[path[-1]]
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in options
    options = tuple(o for o in options if o is not type(None))
    if key in CHOICES:
        return "choice", optional
    if len(options) == 1 and options[0] in (bool, int, float, str):
        return options[0].__name__, optional
    return "yaml", optional


def all_keys() -> list[str]:
    return [k for k, _, _ in reference()]


def reference_text() -> str:
    lines = []
    for key, default, help_text in reference():
        lines.append(f"  {key} (default: {default!r})")
        lines.extend("      " + line for line in textwrap.wrap(help_text, 92))
    return "\n".join(lines)


def reference_markdown() -> str:
    """docs/config-reference.md: every config key with its default and help (tests keep the file in sync)."""
    lines = [
        "# Training config reference",
        "",
        "Every key of `lorakit train`'s YAML config, with its default. Override any of them on the command",
        "line with `--set key=value` (for example `--set train.lr=1e-4`). Generated from",
        "`src/lorakit/train/config.py` and `src/lorakit/config.py`; regenerate with",
        "`python -c 'from lorakit.train.config import reference_markdown as r; print(r(), end=\"\")' > docs/config-reference.md`.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for key, default, help_text in reference():
        lines.append(f"| `{key}` | `{default!r}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
