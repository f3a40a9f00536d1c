"""RunConfig, the training run's settings (``lorakit.train.schema``), read from YAML and ``--set`` by
``lorakit.train.config``: parsing, overrides, coercion of values given as text, unknown keys and their
suggestions, exclusive keys, paths, and every validation message (each names the bad value and the fix).

Fast: nothing here loads a model. ``tests/test_config.py`` holds the older config tests (LoraConfig, paths
against the working directory, aliases of other trainers' keys)."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import yaml

from lorakit.train.config import (
    CompareConfig,
    DpoConfig,
    RunConfig,
    apply_override,
    from_dict,
    load_config,
    resolve_paths,
    steps_for_epochs,
    unknown_keys,
    unknown_keys_message,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(*overrides: str) -> str:
    """The one error ``load_config`` raises for the defaults with ``overrides``."""
    with pytest.raises(ValueError) as err:
        load_config(None, list(overrides))
    return str(err.value)


# ----- parsing -------------------------------------------------------------------------------------------------
def test_no_file_and_no_overrides_give_the_documented_defaults():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert (cfg.model, cfg.objective, cfg.task, cfg.precision, cfg.device) == (
        "default",
        "sft",
        "causal-lm",
        "auto",
        "auto",
    )
    assert (cfg.output_dir, cfg.seed, cfg.overwrite) == ("out/run", 0, False)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, "all-linear")
    t = cfg.train
    assert (t.max_steps, t.epochs, t.batch_size, t.grad_accum, t.lr, t.scheduler) == (100, None, 8, 1, 2e-4, "cosine")
    assert (cfg.data.train, cfg.data.eval, cfg.data.max_length, cfg.data.packing) == ("", None, 512, False)
    assert (cfg.dpo.beta, cfg.dpo.loss_type) == (0.1, "sigmoid")


def test_a_yaml_file_sets_nested_keys_and_the_rest_keep_their_defaults(tmp_path):
    path = write(tmp_path / "run.yaml", "seed: 7\nlora:\n  r: 8\ntrain:\n  lr: 1e-3\n  max_steps: 40\n")
    cfg = load_config(path)
    assert cfg.seed == 7 and cfg.train.max_steps == 40
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.train.batch_size == 8 and cfg.train.scheduler == "cosine"  # the section's other keys: defaults
    # lora's defaults are RunConfig's (alpha 32, all-linear), not LoraConfig's own (alpha 8, q_proj and v_proj)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 32, "all-linear")


def test_an_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "")) == RunConfig()
    assert load_config(write(tmp_path / "comments.yaml", "# nothing set\n")) == RunConfig()


def test_unreadable_files_are_one_error_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(ValueError, match=f"^config file {re.escape(str(missing))} does not exist$"):
        load_config(missing)
    bad = write(tmp_path / "bad.yaml", "train: [1, 2\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))} is not valid YAML: "):
        load_config(bad)
    listed = write(tmp_path / "list.yaml", "- model: default\n")
    with pytest.raises(ValueError) as err:
        load_config(listed)
    assert str(err.value) == f"{listed}: the top level must be a mapping of keys to values"


def test_a_section_given_a_scalar_is_refused():
    assert error_of("train=3") == "train must be a mapping of keys to values, got 3"
    assert error_of("lora=[r]") == "lora must be a mapping of keys to values, got ['r']"


def test_from_dict_builds_any_section_and_refuses_what_is_not_a_mapping():
    cfg = from_dict(RunConfig, {"train": {"lr": "5e-4"}, "data": {"packing": True}}, "")
    assert cfg.train.lr == 5e-4 and cfg.data.packing is True and cfg.train.max_steps == 100
    with pytest.raises(ValueError) as err:
        from_dict(RunConfig, [], "")
    assert str(err.value) == "the config must be a mapping, got []"


def test_to_dict_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(None, ["seed=3", "lora.r=4", "train.scheduler=linear", "data.columns=alpaca"])
    path = write(tmp_path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(path) == cfg


# ----- --set ---------------------------------------------------------------------------------------------------
def test_apply_override_sets_nested_keys_and_returns_the_key():
    data: dict = {"train": {"lr": 0.1}}
    assert apply_override(data, " train.max_steps = 20") == "train.max_steps"
    assert apply_override(data, "lora.target_modules=[q_proj, v_proj]") == "lora.target_modules"
    assert apply_override(data, "data.columns.prompt=question") == "data.columns.prompt"  # sections made as needed
    assert apply_override(data, "data.eval=") == "data.eval"  # nothing after '=': null
    assert apply_override(data, "model=[not yaml") == "model"  # not YAML: kept as the text
    assert data == {
        "train": {"lr": 0.1, "max_steps": 20},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "data": {"columns": {"prompt": "question"}, "eval": None},
        "model": "[not yaml",
    }


@pytest.mark.parametrize("item", ["train.lr", "=3", " =x"])
def test_an_override_without_key_or_equals_sign_is_refused(item):
    with pytest.raises(ValueError) as err:
        apply_override({}, item)
    assert str(err.value) == f"--set {item!r}: write it as key=value, for example --set train.lr=1e-4"


def test_an_override_below_a_value_is_refused():
    with pytest.raises(ValueError) as err:
        apply_override({"train": {"lr": 0.1}}, "train.lr.peak=1")
    assert str(err.value) == "--set 'train.lr.peak=1': lr is not a section"


def test_overrides_apply_in_order_over_the_file(tmp_path):
    path = write(tmp_path / "run.yaml", "train:\n  lr: 1e-3\n  batch_size: 4\n")
    cfg = load_config(path, ["train.lr=2e-3", "train.lr=3e-3", "lora={r: 2}"])
    assert cfg.train.lr == 3e-3 and cfg.train.batch_size == 4  # the last --set wins; the file's other keys stay
    assert cfg.lora.r == 2 and cfg.lora.alpha == 32


# ----- values given as text (the dashboard's form, --set) are read as YAML and coerced -------------------------------
@pytest.mark.parametrize(
    ("item", "attribute", "value"),
    [
        ("train.lr=1e-3", ("train", "lr"), 1e-3),  # YAML reads 1e-3 (no dot) as a string: float() takes it
        ("train.epochs=2", ("train", "epochs"), 2.0),  # an int where a float is due becomes a float
        ("train.max_steps=20", ("train", "max_steps"), 20),
        ("data.packing=yes", ("data", "packing"), True),  # YAML 1.1 booleans
        ("data.packing=false", ("data", "packing"), False),
        ("quantize=null", ("quantize",), None),
        ("train.max_grad_norm=~", ("train", "max_grad_norm"), None),
        ("model=123", ("model",), "123"),  # a number where a string is due is kept as its text
        ("data.columns={prompt: question}", ("data", "columns"), {"prompt": "question"}),
        ("train.report_to=[tensorboard]", ("train", "report_to"), ["tensorboard"]),
    ],
)
def test_values_given_as_text_are_coerced_to_the_keys_type(item, attribute, value):
    cfg = load_config(None, [item])
    got = cfg
    for name in attribute:
        got = getattr(got, name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.max_steps=2.5", "train.max_steps=2.5 has the wrong type: expected int"),
        ("train.max_steps=many", "train.max_steps='many' has the wrong type: expected int"),
        ("train.max_steps=true", "train.max_steps=True has the wrong type: expected int"),  # a bool is no int
        ("seed='3'", "seed='3' has the wrong type: expected int"),
        ("data.packing=maybe", "data.packing='maybe' has the wrong type: expected bool"),
        ("train.max_grad_norm=big", "train.max_grad_norm='big' has the wrong type: expected float"),
        ("train.lr=[1]", "train.lr=[1] has the wrong type: expected float"),
        ("data.columns=[a]", "data.columns=['a'] has the wrong type: expected dict or str"),
        ("train.lr=null", "train.lr cannot be empty"),
        ("attention=", "attention cannot be empty"),
    ],
)
def test_values_of_the_wrong_type_name_the_key_the_value_and_the_type(item, message):
    assert error_of(item) == message


# ----- unknown keys --------------------------------------------------------------------------------------------
def test_unknown_keys_lists_every_unknown_key_with_its_section():
    data = {"modle": "x", "train": {"lr": 1, "lerning_rate": 2}, "lora": {"rr": 4}, "dpo": {"bta": 1}, "seed": 1}
    assert unknown_keys(RunConfig, data, "") == [
        ("modle", ""), ("train.lerning_rate", "train"), ("lora.rr", "lora"), ("dpo.bta", "dpo")
    ]  # fmt: skip
    assert unknown_keys(RunConfig, {"train": 3}, "") == []  # a section's wrong type is from_dict's to report


def test_unknown_keys_message_gives_a_line_per_key_then_the_valid_keys_of_each_section():
    message = unknown_keys_message([("dpo.bta", "dpo"), ("compare.metods", "compare"), ("colour", "")])

    def names(cls) -> str:
        return ", ".join(f.name for f in dataclasses.fields(cls))  # in the schema's (documentation) order

    assert message.splitlines() == [
        "unknown config key 'dpo.bta'. Did you mean 'dpo.beta'?",
        "unknown config key 'compare.metods'. Did you mean 'compare.methods'?",
        "unknown config key 'colour'",
        f"Valid keys in dpo: {names(DpoConfig)}",
        f"Valid keys in compare: {names(CompareConfig)}",
        f"Valid top-level keys: {names(RunConfig)}",
    ]
    assert names(RunConfig).startswith("model, objective, task, precision") and "data, lora, train" in names(RunConfig)


@pytest.mark.parametrize(
    ("key", "first_line"),
    [
        # a key of another section: pointed to its own
        ("lora.lr", "unknown config key 'lora.lr'. Did you mean 'train.lr'? (lr is in the train section)"),
        ("data.seed", "unknown config key 'data.seed'. Did you mean 'seed'? (seed is a top-level key)"),
        # other trainers' names, whatever their case and dashes
        (
            "Learning-Rate",
            "unknown config key 'Learning-Rate': lorakit calls it 'train.lr' (transformers' learning_rate)",
        ),
        (
            "train.num_epochs",
            "unknown config key 'train.num_epochs': lorakit calls it 'train.epochs' (axolotl's num_epochs)",
        ),
        # the former dtype key, in any section, names its replacement
        (
            "train.dtype",
            "unknown config key 'train.dtype': dtype is replaced by precision: bf16 (everything bf16) or bf16-mixed "
            "(float32 adapters under autocast); float32 -> fp32; float16 -> fp16-mixed (CUDA) (lorakit's former key)",
        ),
        # a near miss inside the key's own section
        ("data.max_lenght", "unknown config key 'data.max_lenght'. Did you mean 'data.max_length'?"),
        ("dpo.bta", "unknown config key 'dpo.bta'. Did you mean 'dpo.beta'?"),
    ],
)
def test_unknown_keys_get_their_did_you_mean(key, first_line):
    assert error_of(f"{key}=1").splitlines()[0] == first_line


# ----- exclusive keys ------------------------------------------------------------------------------------------
def test_epochs_and_max_steps_together_are_one_error_naming_both_and_the_way_out():
    assert error_of("train.epochs=3", "train.max_steps=40") == (
        "train.epochs=3 and train.max_steps=40 are both set: keep one (train.epochs: passes over the training data; "
        "train.max_steps: optimizer steps); on the command line, --set train.epochs=null or --set "
        "train.max_steps=null drops one"
    )


def test_a_null_exclusive_key_is_dropped_and_takes_its_default():
    cfg = from_dict(RunConfig, {"train": {"epochs": 1, "max_steps": None}}, "")
    assert cfg.train.epochs == 1.0 and cfg.train.max_steps == 100
    assert load_config(None, ["train.max_steps=null"]).train.max_steps == 100  # null: back to the default
    assert load_config(None, ["train.epochs=null"]).train.epochs is None


def test_a_config_with_epochs_writes_no_max_steps():
    cfg = load_config(None, ["train.epochs=0.5"])
    assert "max_steps" not in cfg.to_dict()["train"] and cfg.to_dict()["train"]["epochs"] == 0.5


# ----- paths ---------------------------------------------------------------------------------------------------
def test_resolve_paths_makes_path_keys_absolute_against_the_base(tmp_path):
    base = tmp_path / "configs"
    (base / "local-model").mkdir(parents=True)
    data = {
        "model": "local-model",
        "output_dir": "out/run",
        "data": {"train": "data/train.jsonl", "eval": "../shared/eval.jsonl"},
        "dpo": {"reference_adapter": "adapters/sft"},
    }
    resolve_paths(data, base)
    assert data == {
        "model": str(base / "local-model"),
        "output_dir": "out/run",  # relative to the working directory, not to the config file
        "data": {"train": str(base / "data" / "train.jsonl"), "eval": str(tmp_path / "shared" / "eval.jsonl")},
        "dpo": {"reference_adapter": str(base / "adapters" / "sft")},
    }


def test_resolve_paths_under_a_key_touches_only_that_key_and_below(tmp_path):
    data = {"data": {"train": "a.jsonl", "eval": "b.jsonl"}, "dpo": {"reference_adapter": "sft"}}
    resolve_paths(data, tmp_path, under="data.eval")
    assert data == {
        "data": {"train": "a.jsonl", "eval": str(tmp_path / "b.jsonl")},
        "dpo": {"reference_adapter": "sft"},
    }
    resolve_paths(data, tmp_path, under="data")
    assert data["data"]["train"] == str(tmp_path / "a.jsonl") and data["dpo"]["reference_adapter"] == "sft"


def test_resolve_paths_keeps_hub_ids_absolute_paths_and_what_is_not_a_path(tmp_path):
    data = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",  # no such directory beside the file: a Hub id
        "data": {"train": "org/dataset:config[train]", "eval": str(tmp_path / "abs.jsonl")},
        "dpo": {"reference_adapter": ""},
    }
    before = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    resolve_paths(data, tmp_path)
    assert data == before
    default = {"model": "default", "data": {"train": 3}}
    resolve_paths(default, tmp_path)
    assert default == {"model": "default", "data": {"train": 3}}


def test_a_hub_like_name_is_a_path_where_one_exists_or_it_is_written_as_a_path(tmp_path):
    (tmp_path / "org").mkdir()
    write(tmp_path / "org" / "data.jsonl", "{}\n")
    data = {"data": {"train": "org/data.jsonl", "eval": "./org/name"}}
    resolve_paths(data, tmp_path)
    assert data["data"] == {"train": str(tmp_path / "org" / "data.jsonl"), "eval": str(tmp_path / "org" / "name")}


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = {"data": {"train": "~/rows.jsonl"}}
    resolve_paths(data, tmp_path / "elsewhere")
    assert data["data"]["train"] == os.path.join(str(tmp_path / "home"), "rows.jsonl")


def test_paths_in_a_file_are_read_against_its_folder_and_set_ones_against_the_working_directory(tmp_path, monkeypatch):
    path = write(tmp_path / "configs" / "run.yaml", "data:\n  train: rows.jsonl\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["data.eval=held.jsonl"])
    assert cfg.data.train == str(tmp_path / "configs" / "rows.jsonl")
    assert cfg.data.eval == str(tmp_path / "held.jsonl")


# ----- steps_for_epochs ----------------------------------------------------------------------------------------
def test_steps_for_epochs_rounds_up_from_the_decimal_written():
    assert steps_for_epochs(1, 100, 8) == 13  # 12.5 -> 13
    assert steps_for_epochs(0.1, 30, 1) == 3  # not 4: 0.1 taken as the decimal, not the binary float above it
    assert steps_for_epochs(0.3, 10, 1) == 3
    assert steps_for_epochs(1e-9, 5, 8) == 1  # at least one step


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 10, 2), "train.epochs=0: use a positive number of passes"),
        ((-0.5, 10, 2), "train.epochs=-0.5: use a positive number of passes"),
        ((float("inf"), 10, 2), "train.epochs=inf: use a positive number of passes"),
        ((1, 0, 2), "steps_for_epochs needs rows >= 1 and batch_size >= 1, got 0 and 2"),
        ((1, 10, 0), "steps_for_epochs needs rows >= 1 and batch_size >= 1, got 10 and 0"),
    ],
)
def test_steps_for_epochs_refuses_nonsense_naming_it(args, message):
    with pytest.raises(ValueError) as err:
        steps_for_epochs(*args)
    assert str(err.value) == message


# ----- validation: every check of schema.check_run, each naming the key, the value and the fix ---------------------
FSDP = "train.strategy=fsdp"
VALIDATION = [
    (["task=summarise"], "task='summarise': use one of ['causal-lm', 'seq2seq', 'classification']"),
    (["precision=fp8"], "precision='fp8': use one of auto, fp32, bf16-mixed, bf16, fp16-mixed"),
    (["attention=''"], "attention='': use auto, sdpa, eager or another implementation transformers accepts"),
    (["device=gpu"], "device='gpu': use auto, cpu, cuda or cuda:N (N a GPU index)"),
    (["device=cuda:x"], "device='cuda:x': use auto, cpu, cuda or cuda:N (N a GPU index)"),
    (["quantize=int4"], "quantize='int4': use nf4, fp4 or int8, or leave it unset for a float base"),
    (["data.eval_fraction=1"], "data.eval_fraction=1.0: use 0 <= value < 1"),
    (["data.eval_fraction=-0.1"], "data.eval_fraction=-0.1: use 0 <= value < 1"),
    (["data.max_length=4"], "data.max_length=4: use at least 8"),
    (
        ["data.columns=bogus"],
        "data.columns='bogus': use a mapping {target: column of the data} (e.g. {prompt: question, completion: "
        "answer}; targets: text, prompt, completion, messages, chosen, rejected, label) or the preset alpaca",
    ),
    (
        ["data.columns={question: prompt}"],
        "data.columns.question: 'question' is not a column lorakit reads; map onto text, prompt, completion, "
        "messages, chosen, rejected, label (as {target: column of the data}, e.g. {prompt: question})",
    ),
    (["data.columns={text: 3}"], "data.columns.text=3: name a column of the data (a string)"),
    (["data.packing_strategy=ffd"], "data.packing_strategy='ffd': use one of ['bfd', 'in_order']"),
    (["train.max_steps=0"], "train.max_steps=0: use at least 1"),
    (
        ["train.epochs=0"],
        "train.epochs=0.0: use a positive number of passes (1, 3, 0.5, ...), or leave it unset",
    ),
    (["train.log_every=-1"], "train.log_every=-1: use 0 (no log lines) or more"),
    (["train.batch_size=0"], "train.batch_size=0: use at least 1"),
    (["train.grad_accum=-1"], "train.grad_accum=-1: use at least 1"),
    (["train.grad_accum=3"], "train.batch_size=8 is not divisible by train.grad_accum=3"),
    (["train.lr=0"], "train.lr=0.0: use a positive learning rate"),
    (["train.scheduler=exponential"], "train.scheduler='exponential': use one of ['constant', 'linear', 'cosine']"),
    (["train.warmup_steps=-1"], "train.warmup_steps=-1: use 0 or more"),
    (["train.keep_last=0"], "train.keep_last=0: keep at least 1 checkpoint"),
    (["train.nan_policy=ignore"], "train.nan_policy='ignore': use stop or skip"),
    (["train.loraplus_lr_ratio=0"], "train.loraplus_lr_ratio=0.0: use a positive ratio or leave it unset"),
    (["train.strategy=zero3"], "train.strategy='zero3': use one of ['ddp', 'fsdp']"),
    (
        ["train.report_to=[tensorboard, tensorboard]"],
        "train.report_to=['tensorboard', 'tensorboard']: list each of ['tensorboard', 'mlflow', 'wandb'] at most "
        "once, e.g. [tensorboard, mlflow]",
    ),
    (
        ["train.report_to=[comet]"],
        "train.report_to=['comet']: list each of ['tensorboard', 'mlflow', 'wandb'] at most once, e.g. "
        "[tensorboard, mlflow]",
    ),
    (
        [FSDP, "quantize=nf4"],
        "train.strategy=fsdp with quantize=nf4: FSDP cannot shard bitsandbytes' quantized weights (they are packed "
        "bytes with separate scales); use train.strategy=ddp for QLoRA, or leave quantize unset",
    ),
    (
        [FSDP, "precision=fp16-mixed"],
        "train.strategy=fsdp with precision=fp16-mixed: the loss scaler's overflow check would differ between the "
        "shards; use precision=bf16-mixed (or auto), or train.strategy=ddp",
    ),
    (
        [FSDP, "lora.init=pissa"],
        "train.strategy=fsdp with lora.init=pissa: saving a PiSSA adapter needs the whole base weights in one "
        "process; use train.strategy=ddp, or another lora.init",
    ),
    (["objective=ppo"], "objective='ppo': use one of ['sft', 'dpo', 'orpo']"),
    (["dpo.beta=0"], "dpo.beta=0.0: use a positive value (0.1 is usual)"),
    (["dpo.loss_type=hinge"], "dpo.loss_type='hinge': use one of ['sigmoid', 'ipo']"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing=0.5: use 0 <= value < 0.5"),
    (["dpo.sft_weight=-1"], "dpo.sft_weight=-1.0: use 0 (plain DPO) or a positive weight"),
    (
        ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"],
        "dpo.label_smoothing=0.1 applies to loss_type=sigmoid, not ipo; set it to 0",
    ),
    (
        ["objective=dpo", "task=seq2seq"],
        "objective=dpo trains causal language models; task='seq2seq' is not one: use task=causal-lm",
    ),
    (
        ["objective=orpo", "data.packing=true"],
        "objective=orpo scores each answer as one sequence; set data.packing=false",
    ),
    (
        ["dpo.sft_weight=1"],
        "dpo.reference_adapter, dpo.precompute_reference and dpo.sft_weight need objective=dpo (objective=sft has no "
        "reference model, and orpo its own NLL term); unset them",
    ),
    (
        ["objective=orpo", "dpo.precompute_reference=true"],
        "dpo.reference_adapter, dpo.precompute_reference and dpo.sft_weight need objective=dpo (objective=orpo has "
        "no reference model, and orpo its own NLL term); unset them",
    ),
    (
        ["objective=dpo", "dpo.reference_adapter=/adapters/sft", FSDP],
        "dpo.reference_adapter with train.strategy=fsdp: the combined adapter is built in one process; use "
        "train.strategy=ddp",
    ),
    # LoraConfig's own checks, prefixed with the section
    (["lora.r=0"], "lora: r=0 is invalid: the rank must be >= 1 (typical values: 4 to 64)"),
]


@pytest.mark.parametrize(("overrides", "message"), VALIDATION, ids=[" ".join(o) for o, _ in VALIDATION])
def test_each_invalid_value_is_one_error_naming_the_value_and_the_fix(overrides, message):
    assert error_of(*overrides) == message


def test_a_zero_grad_accum_is_an_error_naming_it():
    assert error_of("train.grad_accum=0") == "train.grad_accum=0: use at least 1"


def test_the_valid_edges_of_each_range_are_accepted():
    cfg = load_config(None, [
        "data.eval_fraction=0", "data.max_length=8", "train.log_every=0", "train.warmup_steps=0",
        "train.keep_last=1", "dpo.label_smoothing=0.49", "device=cuda:1", "train.batch_size=6", "train.grad_accum=3",
        "train.report_to=[tensorboard, mlflow, wandb]", "train.max_grad_norm=null", "quantize=int8",
    ])  # fmt: skip
    assert cfg.data.max_length == 8 and cfg.train.grad_accum == 3 and cfg.device == "cuda:1"
    assert cfg.train.report_to == ["tensorboard", "mlflow", "wandb"] and cfg.train.max_grad_norm is None
    dpo = load_config(None, ["objective=dpo", "dpo.sft_weight=0.5", "dpo.precompute_reference=true"])
    assert dpo.objective == "dpo" and dpo.dpo.sft_weight == 0.5
