"""lm-evaluation-harness as ``lorakit eval``'s optional backend (``lorakit.harness``): a tiny local task, offline,
scored by the harness's own code with the adapter off (before) and on (after) on one loaded model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import harness

from .conftest import randomize_adapters

pytest.importorskip("lm_eval")

TASK = "lorakit_tiny_choice"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A multiple-choice task over a local JSONL file: the user's own task, no download."""
    d = tmp_path_factory.mktemp("tasks")
    rows = [
        {"question": f"colour of item {i}?", "choices": ["red", "blue", "green"], "answer": i % 3} for i in range(9)
    ]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tiny.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'rows.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return d


@pytest.fixture(scope="module")
def manager(task_dir):
    return harness.task_manager(task_dir)


def _model(tiny_lm_dir, adapter_scale: float | None):
    model, tokenizer = lorakit.load_model(str(tiny_lm_dir))
    if adapter_scale is not None:
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
        if adapter_scale:
            randomize_adapters(model, scale=adapter_scale)
    return model.eval(), tokenizer


def test_an_adapter_that_changes_nothing_changes_no_score(tiny_lm_dir, manager):
    model, tokenizer = _model(tiny_lm_dir, adapter_scale=0.0)  # B = 0: the adapter adds nothing
    scores = harness.before_and_after(model, tokenizer, [TASK], manager, batch_size=4)
    assert [(s.task, s.metric) for s in scores] == [(TASK, "acc,none")]
    assert all(s.before == s.after and s.change == 0.0 for s in scores)


def test_before_is_the_base_and_after_is_the_adapter(tiny_lm_dir, manager):
    """ "before" equals the harness's score of the base loaded alone; "after" equals the adapted model's score
    computed without the adapter ever being switched off; a strong random adapter moves the per-choice
    log-likelihoods the harness ranks."""
    base, tokenizer = _model(tiny_lm_dir, adapter_scale=None)
    alone = harness.run_tasks(base, tokenizer, [TASK], manager, batch_size=4)
    model, _ = _model(tiny_lm_dir, adapter_scale=1.0)
    on = harness.run_tasks(model, tokenizer, [TASK], manager, batch_size=4)
    scores = {s.metric: s for s in harness.before_and_after(model, tokenizer, [TASK], manager, batch_size=4)}
    assert scores["acc,none"].before == alone[TASK]["acc,none"]
    assert scores["acc,none"].after == on[TASK]["acc,none"]
    assert alone[TASK]["acc,none"] != on[TASK]["acc,none"]  # (4 of 9 against 3 of 9 right)
    with torch.no_grad():  # the adapter is on again afterwards, and it does change the model
        ids = tokenizer("colour of item 1? red", return_tensors="pt")["input_ids"]
        adapted = model(ids).logits
        assert not torch.allclose(adapted, base(ids).logits, atol=1e-3)


def test_the_table_lines_up_before_after_and_change():
    scores = harness.compare({"t": {"acc,none": 0.5}}, {"t": {"acc,none": 0.75, "f1,none": 0.1}})
    assert [s.as_record() for s in scores] == [
        {"task": "t", "metric": "acc,none", "before": 0.5, "after": 0.75, "change": 0.25},
        {"task": "t", "metric": "f1,none", "before": None, "after": 0.1, "change": None},
    ]
    lines = harness.table(scores).splitlines()
    assert lines[1].split() == ["t", "acc,none", "0.5000", "0.7500", "+0.2500"]
    assert lines[2].split() == ["t", "f1,none", "-", "0.1000", "-"]


def test_bad_task_names_folders_and_a_missing_harness_are_named(manager, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown task\(s\) no_such_task: .*--lm-eval-include FOLDER"):
        harness.check_tasks(manager, [TASK, "no_such_task"])
    with pytest.raises(ValueError, match="at least one task name"):
        harness.check_tasks(manager, [" "])
    assert harness.check_tasks(manager, [f" {TASK} "]) == [TASK]
    with pytest.raises(ValueError, match=f"--lm-eval-include {tmp_path / 'none'}: not a folder"):
        harness.task_manager(tmp_path / "none")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'lorakit\[eval\]'"):
        harness.task_manager()


def test_lorakit_eval_lm_eval_prints_before_after_and_change(tiny_lm_dir, task_dir, manager, tmp_path, capsys):
    """`lorakit eval --adapter DIR --lm-eval TASK --lm-eval-include FOLDER --json`: the harness's scores with the
    adapter off and on, as the library computes them."""
    from lorakit.cli.main import main

    model, tokenizer = _model(tiny_lm_dir, adapter_scale=1.0)
    lorakit.save_adapter(model, tmp_path / "adapter")
    expected = [s.as_record() for s in harness.before_and_after(model, tokenizer, [TASK], manager, batch_size=4)]
    args = ["eval", "--model", str(tiny_lm_dir), "--adapter", str(tmp_path / "adapter"), "--lm-eval", TASK,
            "--lm-eval-include", str(task_dir), "--batch-size", "4", "--precision", "fp32"]  # fmt: skip
    assert main([*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["lm_eval"] == expected and expected[0]["change"] != 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].split()[:2] == [TASK, "acc,none"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lm-eval", "no_such_task"], r"unknown task\(s\) no_such_task"),
        (["--lm-eval-limit", "3"], r"--lm-eval-limit is an option of --lm-eval; add --lm-eval TASKS"),
        (["--lm-eval", TASK, "--lm-eval-limit", "0"], r"--lm-eval-limit must be >= 1, got 0"),
    ],
)
def test_lorakit_eval_lm_eval_errors_are_one_line(tiny_lm_dir, task_dir, capsys, extra, message):
    import re

    from lorakit.cli.main import main

    args = ["eval", "--model", str(tiny_lm_dir), "--lm-eval-include", str(task_dir), *extra]
    if "--lm-eval" not in extra:
        args = ["eval", "--model", str(tiny_lm_dir), "--data", "x.jsonl", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
