"""A training run's data: the rows read (files, saved datasets or Hugging Face Hub datasets, their columns
renamed as data.columns says), split into training and held-out rows, tokenized (or paired, for preference
objectives) and packed as configured; the data files checked before the model loads; train.epochs turned into
steps once the rows are known."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import (
    EVAL_SPLITS,
    IGNORE,
    DataStats,
    Example,
    PreferencePair,
    as_hub_dataset,
    check_hub_dataset,
    pack,
    read_rows,
    split_eval,
    tokenize_pairs,
    tokenize_rows,
)
from .config import RunConfig, steps_for_epochs
from .tasks import TASKS


def prepare_data(
    cfg: RunConfig, tokenizer, model_config=None, log=None
) -> tuple[list[Example], list[Example], dict[str, DataStats]]:
    """``log``: where the reading of a Hub dataset is reported (its split and rows; None: stderr)."""
    d = cfg.data
    if cfg.objective != "sft":
        return _prepare_pairs(cfg, tokenizer, log)
    task = TASKS[cfg.task]

    def tokenize(row, where):
        return task.tokenize(row, where, tokenizer, d.completion_only, model_config)

    train, held, stats = _tokenized_split(
        cfg, lambda rows: tokenize_rows(rows, tokenizer, d.max_length, d.completion_only, tokenize), log
    )
    if d.packing:
        if task.name != "causal-lm":
            raise ValueError(f"data.packing works for causal-lm only, not task={cfg.task!r}; set data.packing=false")
        train = pack(train, d.max_length, d.packing_strategy)
    if not any(label != IGNORE for e in train for label in e.labels):
        raise ValueError(f"{d.train}: no token carries a loss (every completion is empty or truncated away)")
    return train, held, stats


def _prepare_pairs(
    cfg: RunConfig, tokenizer, log=None
) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, DataStats]]:
    """Preference rows as (chosen, rejected) pairs, for objective=dpo or orpo."""
    return _tokenized_split(cfg, lambda rows: tokenize_pairs(rows, tokenizer, cfg.data.max_length), log)


def _tokenized_split(cfg: RunConfig, tokenize, log=None) -> tuple[list, list, dict[str, DataStats]]:
    """The training rows and the held-out rows (data.eval, or data.eval_fraction of data.train, at most
    data.max_eval_rows), each tokenized by ``tokenize(rows) -> (examples, stats)``. The split comes before
    tokenizing so that each side's statistics count its own rows and tokens."""
    d = cfg.data
    train = read_rows(d.train, d.columns, log=log)
    if d.eval:
        held = read_rows(d.eval, d.columns, splits=EVAL_SPLITS, log=log)
    else:
        train, held = split_eval(train, d.eval_fraction, cfg.seed)
    if d.max_eval_rows is not None:
        held = held[: d.max_eval_rows]
    train, stats = tokenize(train)
    stats = {"train": stats}
    if held:
        held, stats["eval"] = tokenize(held)
    return train, held, stats


def check_data_files(cfg: RunConfig) -> None:
    """Before the model loads: data.train set, each data path there, or each Hub dataset id well-formed (and in
    the cache when offline)."""
    d = cfg.data
    if not d.train:
        raise ValueError(
            "data.train is not set: give a .jsonl, .csv, .parquet file, a saved dataset directory or a Hugging Face "
            "Hub dataset id (org/name, org/name:config[split])"
        )
    for key, path in (("data.train", d.train), ("data.eval", d.eval)):
        if not path or Path(path).expanduser().exists():
            continue
        ref = as_hub_dataset(path)
        if ref is None:
            raise ValueError(
                f"{key}: data file {path} does not exist (a relative path in a config file is read against the "
                "file's directory, one given with --set against the working directory)"
            )
        try:
            check_hub_dataset(ref)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None


def with_epoch_steps(cfg: RunConfig, rows: int, log) -> RunConfig:
    """With train.epochs, the config whose train.max_steps makes that many passes over ``rows``."""
    t = cfg.train
    if t.epochs is None:
        return cfg
    steps = steps_for_epochs(t.epochs, rows, t.batch_size)
    log(f"train.epochs={t.epochs:g}: {steps} steps of {t.batch_size} over {rows} training rows")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, max_steps=steps))
