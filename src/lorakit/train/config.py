"""The training run's YAML config read into ``lorakit.train.schema``'s dataclasses: files and --set overrides,
paths made absolute, type checks, every unknown key reported at once with lorakit's name for it, and the
config reference generated from the fields' docstrings."""

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
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from ..data import as_hub_dataset
from .schema import (
    CHOICES,
    DPO_LOSSES,
    NAN_POLICIES,
    OBJECTIVES,
    REPORTERS,
    SCHEDULERS,
    STRATEGIES,
    CompareConfig,
    DataConfig,
    DpoConfig,
    RunConfig,
    TrainLoopConfig,
    check_run,
)

__all__ = [
    "CHOICES",
    "DPO_LOSSES",
    "NAN_POLICIES",
    "OBJECTIVES",
    "REPORTERS",
    "SCHEDULERS",
    "STRATEGIES",
    "CompareConfig",
    "DataConfig",
    "DpoConfig",
    "RunConfig",
    "TrainLoopConfig",
    "all_keys",
    "check_run",
    "field_docs",
    "field_kind",
    "from_dict",
    "load_config",
    "reference",
    "reference_markdown",
    "reference_text",
    "resolve_paths",
    "steps_for_epochs",
    "unknown_keys",
    "unknown_keys_message",
]


# ----- building from YAML / dicts ------------------------------------------------------------------------
PATH_KEYS = ("data.train", "data.eval", "data.retention_texts", "data.retention_probes", "dpo.reference_adapter")
"""Keys holding paths the run reads. A relative one is read against the config file's directory when written in
the file, against the working directory when given with --set; either way it is stored absolute, so the
config.yaml a run writes works from any directory. ``model`` follows the rule only where such a path exists
(it may also be ``default`` or a Hub id), and so do ``HUB_DATA_KEYS`` where the value reads as a Hub dataset id
(``org/name:config[split]``; a value written as a path, with a data file suffix or ./ ../ / ~ in front, is a
path, even a missing one); ``output_dir`` stays relative to the working directory."""

HUB_DATA_KEYS = ("data.train", "data.eval")
"""Path keys that may also name a Hugging Face Hub dataset (``lorakit.data.hub``)."""


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
    where ``base / model`` exists) at or below the dotted key ``under`` ("": all). A Hub id (``model``, or
    ``HUB_DATA_KEYS`` that read as a dataset id) stays as written unless ``base`` holds a path of that name.
    Other values are left alone."""
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
        exists = (base / Path(value).expanduser()).exists()
        if key == "model" and (value == "default" or not exists):
            continue  # the embedded model, a Hub id, or a path relative to the working directory
        if key in HUB_DATA_KEYS and not exists and as_hub_dataset(value) is not None:
            continue  # a Hugging Face Hub dataset id (org/name:config[split]), or a path of the working directory
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
    "dataset": ("data.train", "a local .jsonl, .csv, .parquet file, saved dataset or Hub dataset id org/name"),
    "dataset_name": (
        "data.train",
        "TRL's dataset_name; a Hub dataset id goes there as org/name, org/name:config or org/name:config[split]",
    ),
    "dataset_config": (
        "lorakit writes the Hub dataset's config after its id: `data.train: org/name:config`",
        "TRL's dataset_config",
    ),
    "dataset_config_name": (
        "lorakit writes the Hub dataset's config after its id: `data.train: org/name:config`",
        "transformers' dataset_config_name",
    ),
    "dataset_train_split": (
        "lorakit writes the split after the Hub id: `data.train: org/name[split]` (default train)",
        "TRL's dataset_train_split",
    ),
    "dataset_test_split": (
        "lorakit writes the evaluation split after the Hub id: `data.eval: org/name[split]` (default validation, "
        "else test)",
        "TRL's dataset_test_split",
    ),
    "dataset_text_field": (
        "lorakit reads the column `text`; to read another, write `data.columns: {text: FIELD}`",
        "TRL's dataset_text_field",
    ),
    "datasets": ("data.train", "axolotl's datasets; its `type: alpaca` is lorakit's `data.columns: alpaca`"),
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
        "`src/lorakit/train/schema.py` and `src/lorakit/config.py`; regenerate with",
        "`python -c 'from lorakit.train.config import reference_markdown as r; print(r(), end=\"\")' > docs/config-reference.md`.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for key, default, help_text in reference():
        lines.append(f"| `{key}` | `{default!r}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
