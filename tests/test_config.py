import math
import re
from pathlib import Path

import pytest
import yaml

from lorakit import LoraConfig
from lorakit.cli.main import main
from lorakit.train.config import load_config, steps_for_epochs


def test_defaults_and_scaling():
    c = LoraConfig(r=16, alpha=32)
    assert c.scaling(16, 32) == 2.0
    rs = LoraConfig(r=16, alpha=32, use_rslora=True)
    assert rs.scaling(16, 32) == pytest.approx(32 / math.sqrt(16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"r": -3}, "r=-3 is invalid"),
        ({"r": 2.5}, "r must be an integer"),
        ({"alpha": 0}, "alpha=0 is invalid"),
        ({"alpha": float("nan")}, "alpha=nan is invalid"),
        ({"dropout": 1.0}, "dropout=1.0 is invalid"),
        ({"dropout": -0.1}, "dropout=-0.1 is invalid"),
        ({"init": "xavier"}, "init='xavier' is not a known method"),
        ({"bias": "some"}, "bias='some' is not valid"),
        ({"target_modules": "q_proj("}, "not a valid regular expression"),
        ({"target_modules": []}, "empty list"),
        ({"target_modules": [""]}, "non-empty strings"),
        ({"exclude_modules": "["}, "not a valid regular expression"),
        ({"rank_pattern": {"q(": 4}}, "rank_pattern key 'q(' is not a valid regular expression"),
        ({"rank_pattern": {"q": 0}}, "ranks are integers >= 1"),
        ({"alpha_pattern": {"q": -1}}, "alphas are numbers > 0"),
        ({"layers_to_transform": [-1]}, "layers_to_transform=[-1] is invalid"),
        ({"layers_pattern": "layers"}, "layers_pattern is set but layers_to_transform is not"),
    ],
)
def test_invalid_values_name_the_value(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace("[", r"\[")):
        LoraConfig(**kwargs)


def test_normalisation():
    c = LoraConfig(target_modules="ALL-LINEAR", layers_to_transform=1, layers_pattern="h", modules_to_save="score")
    assert c.target_modules == "all-linear"
    assert c.layers_to_transform == [1]
    assert c.layers_pattern == ["h"]
    assert c.modules_to_save == ["score"]
    assert LoraConfig(target_modules={"v", "q"}).target_modules == ["q", "v"]


def test_rank_and_alpha_patterns_follow_peft_rule():
    c = LoraConfig(r=8, alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.mlp\..*": 2}, alpha_pattern={"k_proj": 3})
    assert c.rank_and_alpha("model.layers.0.self_attn.q_proj") == (4, 16)
    assert c.rank_and_alpha("model.layers.1.mlp.up_proj") == (2, 16)
    assert c.rank_and_alpha("model.layers.0.self_attn.k_proj") == (8, 3)
    # a pattern matches whole dotted components at the end of the path, not arbitrary substrings
    assert c.rank_and_alpha("model.layers.0.self_attn.xq_proj") == (8, 16)


# ----- the training run's YAML config (lorakit.train.config) ------------------------------------------------
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_config(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working directory that is not the config file's."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_relative_paths_in_a_config_file_are_read_against_its_directory(tmp_path, elsewhere):
    here = tmp_path / "configs"
    (here / "local-model").mkdir(parents=True)
    config = write_config(here / "run.yaml", {
        "model": "local-model", "objective": "dpo", "output_dir": "out/run",
        "data": {"train": "data/train.jsonl", "eval": "../shared/eval.jsonl"},
        "dpo": {"reference_adapter": "adapters/sft"},
    })  # fmt: skip
    cfg = load_config(config)
    assert cfg.data.train == str(here / "data" / "train.jsonl")
    assert cfg.data.eval == str(tmp_path / "shared" / "eval.jsonl")  # normalised: no '..' left
    assert cfg.dpo.reference_adapter == str(here / "adapters" / "sft")
    assert cfg.model == str(here / "local-model")
    assert cfg.output_dir == "out/run"  # relative to the working directory, as transformers' output_dir


def test_absolute_paths_and_model_names_are_kept(tmp_path, elsewhere):
    absolute = str(tmp_path / "data" / "train.jsonl")
    for model in ("default", "HuggingFaceTB/SmolLM2-135M-Instruct", "models/not-beside-the-file"):
        cfg = load_config(write_config(tmp_path / "c" / "run.yaml", {"model": model, "data": {"train": absolute}}))
        assert cfg.model == model and cfg.data.train == absolute
    assert load_config(None).data.train == ""  # unset stays unset


def test_set_paths_are_relative_to_the_working_directory(tmp_path, elsewhere):
    config = write_config(tmp_path / "configs" / "run.yaml", {"data": {"train": "a.jsonl", "eval": "b.jsonl"}})
    (elsewhere / "my-model").mkdir()
    cfg = load_config(config, ["data.train=mine/train.jsonl", f"data.eval={tmp_path / 'abs.jsonl'}",
                               "model=my-model"])  # fmt: skip
    assert cfg.data.train == str(elsewhere / "mine" / "train.jsonl")
    assert cfg.data.eval == str(tmp_path / "abs.jsonl")
    assert cfg.model == str(elsewhere / "my-model")
    whole = load_config(config, ["data={train: x.jsonl}"])  # a whole section given with --set
    assert whole.data.train == str(elsewhere / "x.jsonl")


def test_the_examples_read_their_data_beside_them(elsewhere):
    for name in ("dates.yaml", "compare.yaml", "dpo.yaml"):
        cfg = load_config(EXAMPLES / name)
        for path in (cfg.data.train, cfg.data.eval):
            assert Path(path).parent == EXAMPLES / "data", (name, path)
        assert not Path(cfg.output_dir).is_absolute()


@pytest.mark.parametrize("given", ["file", "set"])
def test_a_missing_data_file_is_named_by_its_absolute_path(given, tmp_path, elsewhere, tiny_lm_dir, capsys):
    config = {"model": str(tiny_lm_dir), "output_dir": str(tmp_path / "out"), "data": {"train": "nowhere.jsonl"}}
    path = write_config(tmp_path / "configs" / "run.yaml", config)
    extra = ["--set", "data.train=nowhere.jsonl"] if given == "set" else []
    assert main(["train", str(path), "--no-progress", *extra]) == 2
    expected = (elsewhere if given == "set" else tmp_path / "configs") / "nowhere.jsonl"
    assert f"data file {expected} does not exist" in capsys.readouterr().err


def test_every_unknown_key_is_reported_at_once(tmp_path):
    config = write_config(tmp_path / "run.yaml", {
        "learning_rate": 1e-4, "modle": "default",
        "train": {"num_train_epochs": 2, "lr": 1e-3, "colour": "red"},
        "lora": {"lora_alpha": 16, "r": 8},
    })  # fmt: skip
    with pytest.raises(ValueError) as err:
        load_config(config)
    lines = str(err.value).splitlines()
    unknown = [line.split("'")[1] for line in lines if line.startswith("unknown config key")]
    assert unknown == ["learning_rate", "modle", "train.num_train_epochs", "train.colour", "lora.lora_alpha"]
    assert "Did you mean 'model'?" in lines[1]
    assert lines[-3].startswith("Valid top-level keys: model, objective")
    assert lines[-2].startswith("Valid keys in train: max_steps, epochs, batch_size")
    assert lines[-1].startswith("Valid keys in lora: r, alpha, dropout")


@pytest.mark.parametrize(
    ("key", "lorakit", "source"),
    [
        ("learning_rate", "train.lr", "transformers' learning_rate"),
        ("train.learning_rate", "train.lr", "transformers' learning_rate"),
        ("num_train_epochs", "train.epochs", "transformers' num_train_epochs"),
        ("train.gradient_accumulation_steps", "train.grad_accum", "transformers' gradient_accumulation_steps"),
        ("lora_alpha", "lora.alpha", "PEFT's lora_alpha"),
        ("lora.lora_alpha", "lora.alpha", "PEFT's lora_alpha"),
        ("lora.lora_dropout", "lora.dropout", "PEFT's lora_dropout"),
        ("train.lr_scheduler_type", "train.scheduler", "transformers' lr_scheduler_type"),
        ("save_total_limit", "train.keep_last", "transformers' save_total_limit"),
        ("max_seq_length", "data.max_length", "TRL's max_seq_length"),
        ("model_name_or_path", "model", "transformers' model_name_or_path"),
    ],
)
def test_names_from_other_trainers_are_given_lorakits(key, lorakit, source):
    with pytest.raises(ValueError) as err:
        load_config(None, [f"{key}=1"])
    assert str(err.value).splitlines()[0] == f"unknown config key {key!r}: lorakit calls it {lorakit!r} ({source})"


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("train.per_device_train_batch_size", "train.batch_size is the global batch"),
        ("micro_batch_size", "train.batch_size is the global batch"),
        ("bf16", "write `precision: bf16-mixed`"),
        ("fp16", "write `precision: fp16-mixed`"),
        ("load_in_4bit", "`quantize: nf4`"),
    ],
)
def test_names_without_a_twin_are_explained(key, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        load_config(None, [f"{key}=1"])


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("train.learning_rate", "'train.lr'"),  # not 'train.tracking_uri'
        ("max_steps", "Did you mean 'train.max_steps'? (max_steps is in the train section)"),
        ("epochs", "Did you mean 'train.epochs'?"),
        ("train.seed", "Did you mean 'seed'? (seed is a top-level key)"),
        ("lora.rr", "Did you mean 'lora.r'?"),
        ("train.warmup", "Did you mean 'train.warmup_steps'?"),
        ("train.lerning_rate", "Did you mean 'train.lr'? (transformers' learning_rate)"),
        ("trian.lr", "Did you mean 'train'?"),
    ],
)
def test_suggestions_are_sensible(key, suggestion):
    with pytest.raises(ValueError) as err:
        load_config(None, [f"{key}=1"])
    first = str(err.value).splitlines()[0]
    assert suggestion in first and "tracking_uri" not in first and "project" not in first


@pytest.mark.parametrize("key", ["train.colour", "train.optimizer_betas", "lora.weights"])
def test_unrelated_keys_get_no_suggestion(key):
    with pytest.raises(ValueError) as err:
        load_config(None, [f"{key}=1"])
    assert str(err.value).splitlines()[0] == f"unknown config key {key!r}"


def test_epochs_or_max_steps_not_both(tmp_path):
    cfg = load_config(None, ["train.epochs=3"])
    assert cfg.train.epochs == 3.0 and cfg.train.max_steps == 100  # the trainer computes the steps from the data
    both = "train.epochs=3 and train.max_steps=40 are both set: keep one"
    with pytest.raises(ValueError, match=re.escape(both)):
        load_config(None, ["train.epochs=3", "train.max_steps=40"])
    config = write_config(tmp_path / "run.yaml", {"train": {"max_steps": 40}})
    with pytest.raises(ValueError, match="--set train.epochs=null or --set train.max_steps=null drops one"):
        load_config(config, ["train.epochs=2"])
    assert load_config(config, ["train.epochs=null"]).train.max_steps == 40
    assert load_config(config, ["train.max_steps=null", "train.epochs=2"]).train.epochs == 2  # the file's dropped


def test_a_run_config_with_epochs_loads_again(tmp_path):
    cfg = load_config(None, ["train.epochs=1.5", f"data.train={tmp_path / 'train.jsonl'}"])
    cfg.train.max_steps = 37  # as the trainer sets it once the data is read
    again = load_config(write_config(tmp_path / "out" / "config.yaml", cfg.to_dict()))
    assert again.train.epochs == 1.5 and again.data.train == cfg.data.train
    assert "max_steps" in load_config(None).to_dict()["train"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "train.epochs=0.0: use a positive number"),
        ("-1", "train.epochs=-1.0: use a positive number"),
        (".inf", "train.epochs=inf: use a positive number"),
        ("many", "train.epochs='many' has the wrong type: expected float"),
    ],
)
def test_epochs_must_be_positive(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [f"train.epochs={value}"])


@pytest.mark.parametrize(
    ("epochs", "rows", "batch_size", "steps"),
    [(1, 100, 8, 13), (2, 100, 10, 20), (0.5, 10, 4, 2), (0.1, 30, 1, 3), (3, 1, 8, 1), (1e-9, 5, 8, 1), (1, 64, 8, 8)],
)
def test_steps_for_epochs(epochs, rows, batch_size, steps):
    assert steps_for_epochs(epochs, rows, batch_size) == steps


def test_steps_for_epochs_refuses_nonsense():
    for args in ((0, 10, 2), (-1, 10, 2), (float("nan"), 10, 2), (1, 0, 2), (1, 10, 0)):
        with pytest.raises(ValueError):
            steps_for_epochs(*args)


def test_log_every():
    assert load_config(None).train.log_every == 10 and load_config(None, ["train.log_every=0"]).train.log_every == 0
    with pytest.raises(ValueError, match=re.escape("train.log_every=-1: use 0 (no log lines) or more")):
        load_config(None, ["train.log_every=-1"])


def test_precision_defaults_to_auto_and_takes_each_name():
    from lorakit.precision import PRECISIONS
    from lorakit.train.config import CHOICES, field_kind

    assert load_config(None).precision == "auto"
    assert [load_config(None, [f"precision={name}"]).precision for name in PRECISIONS] == list(PRECISIONS)
    assert CHOICES["precision"] == PRECISIONS and "dtype" not in CHOICES  # the dashboard's menu
    assert field_kind("precision") == ("choice", False)
    message = "precision='fp8': use one of auto, fp32, bf16-mixed, bf16, fp16-mixed"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, ["precision=fp8"])


@pytest.mark.parametrize("value", ["bfloat16", "float32", "float16"])
def test_the_former_dtype_key_is_refused_naming_its_replacement(tmp_path, value):
    path = write_config(tmp_path / "old.yaml", {"dtype": value})
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(err.value).splitlines()[0] == (
        "unknown config key 'dtype': dtype is replaced by precision: bf16 (everything bf16) or bf16-mixed (float32 "
        "adapters under autocast); float32 -> fp32; float16 -> fp16-mixed (CUDA) (lorakit's former key)"
    )


@pytest.mark.parametrize("key", ["torch_dtype", "mixed_precision"])
def test_other_trainers_precision_keys_point_to_precision(key):
    with pytest.raises(ValueError, match=re.escape(f"unknown config key {key!r}: lorakit calls it 'precision'")):
        load_config(None, [f"{key}=bf16"])
