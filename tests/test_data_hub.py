"""Training data by Hugging Face Hub dataset id, read offline from a cache in the Hub's own layout, and
``data.columns`` renaming columns (the Alpaca preset included)."""

from __future__ import annotations

import io
import json

import pytest

import lorakit
from lorakit.cli.main import main
from lorakit.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    EVAL_SPLITS,
    HubDataset,
    as_hub_dataset,
    columns_problem,
    map_columns,
    read_rows,
)
from lorakit.train.config import load_config

from .conftest import colour_rows
from .hub_cache import add_repo, offline_hub  # noqa: F401 (offline_hub is a fixture)

CONFIGS_README = b"""---
configs:
- config_name: small
  data_files:
  - split: train
    path: small/train.jsonl
  - split: test
    path: small/test.jsonl
- config_name: big
  data_files:
  - split: train
    path: big/train.jsonl
---
# acme/configs
"""


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _parquet(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def alpaca_rows(n: int, tag: str = "") -> list[dict[str, str]]:
    """Rows shaped as tatsu-lab/alpaca's: instruction, input (empty for every other row), output."""
    return [
        {"instruction": f"Name the colour of item {i}{tag}.", "input": f"item {i}" if i % 2 else "",
         "output": ("red", "blue", "green")[i % 3]}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def hub_data(offline_hub, tmp_path, monkeypatch):  # noqa: F811
    """Datasets in the offline hub cache (datasets' own cache emptied beside it):

    - acme/colours: chat rows, data/train.jsonl and data/validation.jsonl (split names from file names);
    - acme/alpaca: one Parquet shard data/train-00000-of-00001.parquet, as tatsu-lab/alpaca is stored;
    - acme/configs: configs small (train, test) and big (train) declared in README.md;
    - acme/colours at tag v2: a train split of 5 rows only."""
    import datasets.config

    prepared = tmp_path / "hf-home" / "datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(prepared))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", prepared)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    add_repo(offline_hub, "acme/colours", {"data/train.jsonl": _jsonl(colour_rows(24)),
             "data/validation.jsonl": _jsonl(colour_rows(6, seed=1))}, kind="datasets")  # fmt: skip
    add_repo(offline_hub, "acme/colours", {"data/train.jsonl": _jsonl(colour_rows(5, seed=2))}, kind="datasets",
             ref="v2", seed="v2")  # fmt: skip
    add_repo(offline_hub, "acme/alpaca", {"data/train-00000-of-00001.parquet": _parquet(alpaca_rows(24))},
             kind="datasets")  # fmt: skip
    add_repo(offline_hub, "acme/configs", {"README.md": CONFIGS_README, "small/train.jsonl": _jsonl(alpaca_rows(5)),
             "small/test.jsonl": _jsonl(alpaca_rows(2, "t")), "big/train.jsonl": _jsonl(alpaca_rows(9, "b"))},
             kind="datasets")  # fmt: skip
    return offline_hub


@pytest.mark.parametrize(
    "value, expected",
    [
        ("tatsu-lab/alpaca", HubDataset("tatsu-lab/alpaca")),
        ("imdb", HubDataset("imdb")),
        ("org/name:config", HubDataset("org/name", "config")),
        ("org/name[test]", HubDataset("org/name", split="test")),
        ("org/name:config[validation]", HubDataset("org/name", "config", "validation")),
        ("org/name@v1.0:config[train]", HubDataset("org/name", "config", "train", "v1.0")),
        ("org/name@refs/pr/1", HubDataset("org/name", revision="refs/pr/1")),
        ("train.jsonl", None),  # a data file suffix: a path, even a missing one
        ("org/name.parquet", None),
        ("./org/name", None),
        ("/data/org/name", None),
        ("~/name", None),
        ("a/b/c", None),
        ("org--x/name", None),
        ("org/-name", None),
        ("", None),
    ],
)
def test_dataset_ids_parse_into_repo_config_split_and_revision(value, expected):
    assert as_hub_dataset(value) == expected


def test_a_cached_dataset_reads_offline_by_id_config_split_and_revision(hub_data):
    logged = []
    rows = read_rows("acme/colours", log=logged.append)
    assert len(rows) == 24 and rows[0][0] == "acme/colours[train] row 0"
    assert rows[0][1] == colour_rows(24)[0]
    assert logged == ["acme/colours[train]: 24 rows from the Hugging Face Hub dataset (no split given: train)"]
    held = read_rows("acme/colours", splits=EVAL_SPLITS, log=logged.append)
    assert [r for _, r in held] == colour_rows(6, seed=1)
    assert "validation, the first of validation, test it has" in logged[-1]
    assert [r for _, r in read_rows("acme/colours@v2", log=logged.append)] == colour_rows(5, seed=2)
    assert len(read_rows("acme/colours[validation]", log=logged.append)) == 6

    parquet = read_rows("acme/alpaca", log=logged.append)  # the Parquet shard, as the Hub stores most datasets
    assert [r for _, r in parquet] == alpaca_rows(24)
    assert len(read_rows("acme/configs:big", log=logged.append)) == 9
    small_eval = read_rows("acme/configs:small", splits=EVAL_SPLITS, log=logged.append)  # no validation: test
    assert small_eval[0][0] == "acme/configs:small[test] row 0" and len(small_eval) == 2


@pytest.mark.parametrize(
    "value, message",
    [
        ("acme/colours[tset]", "acme/colours[tset]: the dataset has no split 'tset'; its splits: train, validation "
                               "(e.g. acme/colours[train])"),
        ("acme/configs", "acme/configs: the dataset has several configs (small, big): name one, e.g. "
                         "acme/configs:small"),
        ("acme/configs:tiny", "acme/configs:tiny: no config 'tiny'; its configs: small, big (e.g. acme/configs:small)"),
        ("acme/configs:big[test]", "acme/configs:big[test]: the dataset has no split 'test'; its splits: train"),
        ("acme/missing", "acme/missing: offline mode is on (HF_HUB_OFFLINE=1), and the Hugging Face Hub dataset "
                         "acme/missing is not in the local cache"),
        ("./acme/colours", "data file ./acme/colours does not exist"),
    ],
)  # fmt: skip
def test_what_cannot_be_read_is_one_line_naming_the_id_and_the_fix(hub_data, value, message):
    with pytest.raises(ValueError) as err:
        read_rows(value, log=lambda _: None)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    if value == "acme/missing":
        assert f"HF_HUB_CACHE={hub_data}" in str(err.value)
        assert "`hf download acme/missing --repo-type dataset`" in str(err.value)


def test_a_local_path_of_the_same_name_wins(hub_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme").mkdir()
    import datasets

    datasets.Dataset.from_list([{"text": "local"}]).save_to_disk(str(tmp_path / "acme" / "colours"))
    assert read_rows("acme/colours") == [("acme/colours row 0", {"text": "local"})]


def test_an_unreachable_hub_falls_back_to_the_cached_copy_with_a_word(hub_data, monkeypatch):
    """Online but without a network: load_dataset(id) fails to connect, the cached snapshot is read instead."""
    import datasets
    import datasets.config
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    original = datasets.load_dataset

    def no_network(path, *args, **kwargs):
        if path.startswith("acme/"):
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    logged = []
    assert len(read_rows("acme/colours", log=logged.append)) == 24
    assert logged[0].startswith("acme/colours: the Hugging Face Hub could not be reached (ConnectionError")
    assert "reading the cached copy in " + str(hub_data / "datasets--acme--colours" / "snapshots") in logged[0]
    with pytest.raises(ValueError, match="acme/missing: the Hugging Face Hub could not be reached .* not in the local"):
        read_rows("acme/missing", log=logged.append)


def test_columns_rename_and_the_alpaca_preset_fills_its_template():
    rows = [("f:1", {"question": "q?", "answer": "a", "id": 7})]
    assert map_columns(rows, {"prompt": "question", "completion": "answer"}) == [
        ("f:1", {"id": 7, "prompt": "q?", "completion": "a"})
    ]
    with pytest.raises(ValueError, match=r"f:1: data.columns maps completion to column 'answr', which the data "
                                         r"lacks; its columns: question, answer, id; did you mean 'answer'\?"):  # fmt: skip
        map_columns(rows, {"prompt": "question", "completion": "answr"})
    with_input, without = alpaca_rows(2)[1], alpaca_rows(2)[0]
    mapped = map_columns([("a", with_input), ("b", without), ("c", {**without, "input": None})], "alpaca")
    assert mapped[0][1] == {
        "prompt": ALPACA_PROMPT.format(instruction=with_input["instruction"], input="item 1"),
        "completion": "blue",
    }
    assert mapped[0][1]["prompt"].endswith("### Input:\nitem 1\n\n### Response:\n")
    assert mapped[1][1]["prompt"] == ALPACA_PROMPT_NO_INPUT.format(instruction=without["instruction"])
    assert mapped[2][1] == mapped[1][1]
    with pytest.raises(ValueError, match="row 3: data.columns=alpaca needs a column 'output'"):
        map_columns([("row 3", {"instruction": "x", "response": "y"})], "alpaca")
    assert columns_problem({"answer": "output"}).startswith("data.columns.answer: 'answer' is not a column lorakit")
    assert "use a mapping {target: column of the data}" in columns_problem("sharegpt")
    assert columns_problem({"prompt": "q"}) is None and columns_problem("alpaca") is None


def test_the_config_keeps_a_dataset_id_as_written_and_refuses_bad_columns(tmp_path):
    (tmp_path / "run.yaml").write_text("data:\n  train: tatsu-lab/alpaca\n  eval: org/name:main[test]\n"
                                       "  columns: alpaca\n")  # fmt: skip
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.data.train, cfg.data.eval, cfg.data.columns) == ("tatsu-lab/alpaca", "org/name:main[test]", "alpaca")
    (tmp_path / "local.jsonl").write_text("")
    (tmp_path / "run2.yaml").write_text("data:\n  train: local.jsonl\n")  # a path: made absolute beside the file
    assert load_config(tmp_path / "run2.yaml").data.train == str(tmp_path / "local.jsonl")
    cfg = load_config(None, ["data.columns.prompt=question", "data.columns.completion=answer"])
    assert cfg.data.columns == {"prompt": "question", "completion": "answer"}
    with pytest.raises(ValueError, match="data.columns.answer: 'answer' is not a column lorakit reads"):
        load_config(None, ["data.columns.answer=output"])


def test_train_and_eval_read_hub_datasets_offline(hub_data, tiny_lm_dir, tmp_path, capsys):
    """The Alpaca-shaped Parquet dataset trains through data.columns=alpaca, the chat one evaluates from its
    validation split; the run's config.yaml keeps the ids; a missing id stops before the model loads."""
    sets = [f"model={tiny_lm_dir}", f"output_dir={tmp_path / 'run'}", "data.train=acme/alpaca", "data.columns=alpaca",
            "data.eval=acme/configs:small", "data.max_length=384", "lora.r=4", "train.batch_size=8",
            "train.max_steps=2", "train.generate_eval=false", "precision=fp32"]  # fmt: skip
    assert main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    err = capsys.readouterr().err
    assert "acme/alpaca[train]: 24 rows from the Hugging Face Hub dataset" in err
    assert "acme/configs:small[test]: 2 rows" in err
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.data.train, saved.data.eval, saved.data.columns) == ("acme/alpaca", "acme/configs:small", "alpaca")
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()

    assert main(["eval", "--model", str(tiny_lm_dir), "--adapter", str(tmp_path / "run"), "--data", "acme/colours",
                 "--no-generate", "--json", "--precision", "fp32"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["loss"] > 0 and "acme/colours[validation]: 6 rows" in err
    assert main(["eval", "--model", str(tiny_lm_dir), "--data", "acme/configs:big[train]", "--columns",
                 "prompt=instruction,completion=output", "--no-generate", "--json", "--precision", "fp32"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["loss"] > 0 and "acme/configs:big[train]: 9 rows" in err
    bad = [a for s in [*sets[:2], "data.train=acme/not-cached", f"output_dir={tmp_path / 'bad'}"] for a in ("--set", s)]
    assert main(["train", "--no-progress", *bad]) == 2
    err = capsys.readouterr().err
    assert "data.train: acme/not-cached: offline mode is on (HF_HUB_OFFLINE=1)" in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "adapter_model.safetensors").exists()


def test_the_dashboard_form_accepts_a_dataset_id(hub_data, tmp_path):
    from lorakit.ui.forms import check_paths
    from lorakit.ui.runs import Workspace

    (tmp_path / "runs").mkdir()
    ws = Workspace(tmp_path / "runs", tmp_path)
    config = lorakit.train.config.load_config(None, ["data.train=acme/alpaca", "data.eval=acme/colours[validation]"])
    assert check_paths(config, ws, "default") == {}
    config = lorakit.train.config.load_config(None, ["data.train=missing.jsonl"])
    assert "data.train" in check_paths(config, ws, "default")
