"""The training run's settings: documented dataclasses (every field's docstring is its help text: ``lorakit train
--help``, docs/config-reference.md, the dashboard's form) and the cross-field checks, each error naming the key
to change. Reading YAML and --set into them is ``lorakit.train.config``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .._bnb import QUANT_METHODS
from ..config import BIAS_MODES, INIT_METHODS, LoraConfig
from ..data import PACKING_STRATEGIES, columns_problem
from ..models import TASK_NAMES
from ..precision import PRECISIONS
from .distributed import DEVICE_PATTERN

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
    """Training data: a .jsonl, .csv or .parquet file, a directory saved by Hugging Face `datasets`, or a dataset
    of the Hugging Face Hub: org/name, org/name:config, org/name[split], org/name:config[split] (a bare name too;
    @revision after the name picks a branch, tag or commit; the split defaults to train). A path that exists always
    wins; a value ending in .jsonl, .json, .csv, .parquet or starting with ./ ../ / ~ is always a path. Hub datasets
    load with `datasets.load_dataset` through the usual caches (HF_HOME, HF_HUB_CACHE, HF_DATASETS_CACHE): a missing
    one downloads, a cached one (from `hf download ID --repo-type dataset` or an earlier run) also loads with
    HF_HUB_OFFLINE=1; a gated or private one needs HF_TOKEN or `hf auth login`. Rows hold `text`, or `prompt` +
    `completion`, or chat `messages` (a list of {role, content}); other column names: see columns. A relative path
    in a config file is relative to that file's directory (given with --set: to the working directory)."""

    eval: str | None = None
    """Evaluation data in the same forms (a relative path: as for train); a Hub id without [split] takes the
    dataset's validation split, else its test split (the log says which). If unset, `eval_fraction` of the
    training rows is held out."""

    columns: dict[str, str] | str | None = None
    """Rename the data's columns to those lorakit reads, for train and eval, local files and Hub datasets alike:
    a mapping {target: column of the data}, targets text, prompt, completion, messages, chosen, rejected, label
    (e.g. {prompt: question, completion: answer}; the row's other columns stay; on the command line --set
    data.columns.prompt=question). Or `alpaca`: rows of instruction, input (optional) and output become prompt +
    completion, the completion the output and the prompt the Alpaca template: "Below is an instruction that
    describes a task, paired with an input that provides further context. Write a response that appropriately
    completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n", or
    with an empty or missing input "Below is an instruction that describes a task. Write a response that
    appropriately completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n". Unset: the
    columns as they are."""

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

    retention_texts: str | None = None
    """General text for retention's drift (JSONL, one {"text": ...} per line); unset: the set lorakit ships."""

    retention_probes: str | None = None
    """Probe questions for retention's kept knowledge (JSONL: question, choices, answer); unset: lorakit's set."""


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

    eval_batch_size: int | None = None
    """Rows (pairs, for dpo and orpo) per forward pass at evaluation, on each process (under torchrun each
    process evaluates its share of the rows). Unset: the rows of one training forward, batch_size / (processes x
    grad_accum): evaluation keeps no activations for backward and runs the head in chunks, so it fits where a
    training step does."""

    nan_policy: str = "stop"
    """On a NaN or infinite loss or gradient: stop (keep the last good checkpoint) or skip (drop the step, count it)."""

    eval_before: bool = True
    """Evaluate the untrained model first (the 'before' of a before/after comparison)."""

    eval_retention: bool = False
    """After training, also measure retention: how much of the base model's general behaviour the trained model
    kept (kept share of general-knowledge probes, KL drift on general text; lorakit eval --retention)."""

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

    seeds: int = 1
    """Times each method trains, with seeds seed, seed + 1, ...: the table gives the mean and spread over them."""

    retention: bool = True
    """Measure each trained model's retention of the base's general behaviour (lorakit eval --retention)."""


@dataclass
class RunConfig:
    model: str = "default"
    """Base model: a Hugging Face Hub id (`org/name`, `org/name@revision`, `org/name:file.gguf`; read from the
    Hugging Face cache, downloaded when missing and online), a local Hugging Face directory, a .gguf file, or
    `default` (the embedded SmolLM2-135M-Instruct, no network needed). A relative path that exists beside the config
    file is read from there, else from the working directory."""

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

    device: str = "auto"
    """Where the run computes: auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda, or cuda:N for
    one process on GPU N (under torchrun each process takes the GPU of its LOCAL_RANK: use cuda or auto). On CUDA,
    float32 products may use TF32 tensor cores."""

    attention: str = "auto"
    """The attention implementation transformers builds the model with: auto (transformers' choice: sdpa, PyTorch's
    scaled_dot_product_attention, where the model supports it), sdpa, eager (the model's own maths), or another
    implementation transformers accepts (flash_attention_2 on a GPU with flash-attn installed); one the model does
    not support is refused when it loads."""

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
            bool(c.attention) and isinstance(c.attention, str),
            f"attention={c.attention!r}: use auto, sdpa, eager or another implementation transformers accepts",
        ),
        (
            bool(DEVICE_PATTERN.fullmatch(str(c.device))),
            f"device={c.device!r}: use auto, cpu, cuda or cuda:N (N a GPU index)",
        ),
        (
            c.quantize is None or c.quantize in QUANT_METHODS,
            f"quantize={c.quantize!r}: use {', '.join(QUANT_METHODS[:-1])} or {QUANT_METHODS[-1]}, or leave it unset "
            "for a float base",
        ),
        (0 <= c.data.eval_fraction < 1, f"data.eval_fraction={c.data.eval_fraction}: use 0 <= value < 1"),
        (c.data.max_length >= 8, f"data.max_length={c.data.max_length}: use at least 8"),
        (columns_problem(c.data.columns) is None, str(columns_problem(c.data.columns))),
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
            c.train.eval_batch_size is None or c.train.eval_batch_size >= 1,
            f"train.eval_batch_size={c.train.eval_batch_size}: use at least 1 row per forward pass, or leave it unset "
            "(the rows of one training forward)",
        ),
        (
            c.train.grad_accum < 1 or c.train.batch_size % c.train.grad_accum == 0,  # < 1: refused just above
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
