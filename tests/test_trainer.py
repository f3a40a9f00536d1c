"""End-to-end training on a tiny model: loss falls, outputs, resume equivalence, Ctrl-C, NaN, config errors."""

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.main import main
from lorakit.train import loop as loop_module
from lorakit.train import objectives
from lorakit.train import trainer as trainer_module
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.config import all_keys, field_docs, load_config, reference
from lorakit.train.metrics import read_metrics
from lorakit.train.trainer import TrainingStopped, train

from .conftest import colour_rows, torchrun_train, write_jsonl


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def test_training_lowers_loss_and_writes_outputs(run_config):
    result = train(run_config(), progress=False)
    out = result.output_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl", "loss.png"} <= {
        p.name for p in out.iterdir()
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_losses) == 12
    assert sum(train_losses[-3:]) / 3 < 0.6 * sum(train_losses[:3]) / 3
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 12] and evals[1]["loss"] < evals[0]["loss"]
    assert result.steps == 12 and result.final_loss == train_losses[-1]
    # the returned evaluations are the recorded ones, of every eval row, before and after training
    assert (result.eval_before.loss, result.eval.loss) == (evals[0]["loss"], evals[1]["loss"])
    assert (result.eval_before.exact_match, result.eval.exact_match) == (
        evals[0]["exact_match"],
        evals[1]["exact_match"],
    )
    assert result.eval_before.scored == result.eval.scored == evals[1]["scored"] == 12
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_schedules_warmup_and_loraplus(run_config):
    from lorakit import inject
    from lorakit.models import load_model
    from lorakit.train.optim import build_optimizer

    for scheduler, expected_end in (("constant", 1.0), ("linear", 0.0), ("cosine", 0.0)):
        cfg = run_config(f"train.scheduler={scheduler}", "train.loraplus_lr_ratio=16", "train.max_steps=10")
        model, _ = load_model(cfg.model)
        inject(model, cfg.lora)
        opt, sched = build_optimizer(model, cfg)
        assert [g["lr"] for g in opt.param_groups] == [pytest.approx(5e-2 / 3), pytest.approx(80e-2 / 3)]
        assert all(
            ".lora_B." not in n
            for n, p in model.named_parameters()
            if any(p is q for q in opt.param_groups[0]["params"])
        )
        for _ in range(10):
            opt.step()
            sched.step()
        assert sched.get_last_lr()[0] == pytest.approx(5e-2 * expected_end, abs=1e-9)


def test_resume_after_ctrl_c_matches_uninterrupted_run(run_config, monkeypatch):
    reference_run = train(run_config("train.save_every=4", out="straight"), progress=False)
    original = loop_module.Loop._periodic

    def interrupt_at_7(self, eval_rows):
        original(self, eval_rows)
        if self.step == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module.Loop, "_periodic", interrupt_at_7)
    with pytest.raises(KeyboardInterrupt):
        train(run_config("train.save_every=4", out="resumed"), progress=False)
    resumed_dir = reference_run.output_dir.parent / "resumed"
    assert [p.name for p in list_checkpoints(resumed_dir / "checkpoints")] == ["step-0000004", "step-0000007"]
    monkeypatch.setattr(loop_module.Loop, "_periodic", original)
    train(run_config("train.save_every=4", out="resumed"), resume=True, progress=False)
    want, got = _adapter(reference_run.output_dir), _adapter(resumed_dir)
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    steps = [json.loads(line)["step"] for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(8) == 1  # the resumed run rewrote the steps after the checkpoint, not duplicated them


def test_keep_last_checkpoints(run_config):
    result = train(run_config("train.save_every=2", "train.keep_last=2"), progress=False)
    assert [p.name for p in list_checkpoints(result.output_dir / "checkpoints")] == ["step-0000008", "step-0000010"]


def test_gradient_accumulation_gives_the_same_adapter(run_config):
    one = train(run_config("train.max_steps=3", out="one"), progress=False)
    four = train(run_config("train.max_steps=3", "train.grad_accum=4", out="four"), progress=False)
    a, b = _adapter(one.output_dir), _adapter(four.output_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_nan_loss_stops_and_keeps_last_good_checkpoint(run_config, monkeypatch):
    real = objectives.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, task):
        calls["n"] += 1
        loss, n = real(model, batch, task)
        return (loss * float("nan") if calls["n"] == 6 else loss), n

    monkeypatch.setattr(objectives, "token_loss_sum", poisoned)
    with pytest.raises(TrainingStopped, match=r"loss became nan at step 6.*last good checkpoint is .*step-0000004"):
        train(run_config("train.save_every=2", "train.keep_last=5", "train.generate_eval=false"), progress=False)
    calls["n"] = 0
    result = train(run_config("train.nan_policy=skip", "train.generate_eval=false", out="skip"), progress=False)
    assert result.skipped_steps == 1


def test_existing_output_dir_is_refused(run_config):
    out = train(run_config("train.max_steps=1"), progress=False).output_dir
    written = {
        name: (out / name).read_bytes() for name in ("metrics.jsonl", "status.json", "adapter_model.safetensors")
    }
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(run_config("train.max_steps=1"), progress=False)
    assert {name: (out / name).read_bytes() for name in written} == written  # the refused run touched nothing
    train(run_config("train.max_steps=2", "overwrite=true"), progress=False)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2]  # the old run's records replaced, not appended to
    assert (out / "adapter_model.safetensors").read_bytes() != written["adapter_model.safetensors"]


def test_config_reference_documents_every_key():
    keys = all_keys()
    assert "train.lr" in keys and "lora.target_modules" in keys and "data.packing" in keys
    assert all(help_text for _, _, help_text in reference()), "every config field needs a docstring"
    assert field_docs(type(load_config(None).train))["lr"].startswith("Peak learning rate")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lerning_rate=1"], "unknown config key 'train.lerning_rate'"),
        (["trian.lr=1"], "Did you mean 'train'"),
        (["lora.rr=3"], "Did you mean 'lora.r'"),
        (["train.max_steps=many"], "train.max_steps='many' has the wrong type: expected int"),
        (["train.scheduler=cosin"], "train.scheduler='cosin': use one of"),
        (["lora.r=0"], "lora: r=0 is invalid"),
        (["train.batch_size=6", "train.grad_accum=4"], "not divisible by train.grad_accum"),
        (["no_equals_sign"], "write it as key=value"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, overrides)


def test_yaml_file_and_cli_errors(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("train:\n  lr: 1.0e-3\nlora:\n  r: 4\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.lr=2e-3"])
    assert cfg.train.lr == 2e-3 and cfg.lora.r == 4 and cfg.lora.alpha == 32  # section defaults kept
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "data.train is not set" in capsys.readouterr().err


def test_train_help_lists_config_reference():
    import os

    env = {**os.environ, "COLUMNS": "200"}  # argparse wraps the options' help to the terminal's width
    out = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--help"], capture_output=True, text=True, check=True, env=env
    )
    lines = out.stdout.splitlines()
    missing = [key for key, default, _ in reference() if f"  {key} (default: {default!r})" not in lines]
    assert missing == [], missing  # every config key with its default
    assert any(re.fullmatch(r"  --resume +continue from the newest checkpoint in output_dir", line) for line in lines)


def test_cli_train_eval_generate(run_config, tiny_lm_dir, tmp_path, capsys):
    cfg = run_config()
    sets = [arg for k, v in _flat(cfg).items() for arg in ("--set", f"{k}={v}")]
    code = main(["train", "--no-progress", *sets])
    assert code == 0
    out = capsys.readouterr().out
    before, after = [r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if r["kind"] == "eval"]
    versus = f"exact match: {100 * before['exact_match']:.1f}% before -> {100 * after['exact_match']:.1f}% after"
    written = re.escape(f"adapter written to {cfg.output_dir} (12 steps, median ") + r"\d+ tokens/s a step\)"
    assert re.fullmatch(re.escape(versus) + "\n" + written + "\n", out), out
    assert (
        main(["eval", "--model", str(tiny_lm_dir), "--adapter", cfg.output_dir, "--data", cfg.data.eval, "--json"]) == 0
    )
    record = json.loads(capsys.readouterr().out)
    # the saved adapter, loaded again, scores the eval rows as the run did at its end (same precision: auto)
    assert record["scored"] == after["scored"] == 12 and record["exact_match"] == after["exact_match"]
    assert record["loss"] == pytest.approx(after["loss"], rel=1e-4)
    assert main(["generate", "--model", str(tiny_lm_dir), "--adapter", cfg.output_dir, "--chat", "colour of item 2?",
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
    assert main(["generate", "--model", str(tiny_lm_dir), "--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def _flat(cfg) -> dict:
    return {
        "model": cfg.model,
        "output_dir": cfg.output_dir,
        "data.train": cfg.data.train,
        "data.eval": cfg.data.eval,
        "data.max_length": cfg.data.max_length,
        "lora.r": cfg.lora.r,
        "train.max_steps": cfg.train.max_steps,
        "train.lr": cfg.train.lr,
        "train.max_new_tokens": 4,
    }


def test_ddp_two_processes_match_one(run_config, tmp_path):
    single = train(run_config("train.max_steps=4", out="single"), progress=False)
    ddp_cfg = run_config("train.max_steps=4", out="ddp").to_dict()
    done = torchrun_train(ddp_cfg, tmp_path)
    a, b = _adapter(single.output_dir), _adapter(Path(ddp_cfg["output_dir"]))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert done.stderr.count("trainable params") == 1  # only rank 0 prints
    assert done.stdout.count("adapter written to") == 1


def test_docs_config_reference_is_current():
    from lorakit.train.config import reference_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"
    assert doc.read_text() == reference_markdown(), "regenerate docs/config-reference.md (command in its header)"


def test_gradient_checkpointing_gives_the_same_adapter(run_config):
    plain = train(run_config("train.max_steps=2", "train.generate_eval=false", out="plain"), progress=False)
    ckpt = train(
        run_config("train.max_steps=2", "train.generate_eval=false", "train.gradient_checkpointing=true", out="gc"),
        progress=False,
    )
    a, b = _adapter(plain.output_dir), _adapter(ckpt.output_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.integration
def test_default_model_trains_a_few_steps(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import make_dates

    train_path, eval_path = make_dates.write(tmp_path / "data", train=16, eval_rows=4)
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "examples" / "dates.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={train_path}",
            f"data.eval={eval_path}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.warmup_steps=0",
        ],
    )
    result = train(cfg, progress=False)
    assert result.steps == 2 and result.eval.loss < result.eval_before.loss
    assert (result.output_dir / "adapter_model.safetensors").stat().st_size > 1_000_000


@pytest.fixture(scope="module")
def tiny_t5_and_bert(tmp_path_factory, tiny_tokenizer):
    from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(tiny_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=tiny_tokenizer.eos_token_id,
            decoder_start_token_id=0,
        )
    )
    t5.save_pretrained(root / "t5")
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
            label2id={"red": 0, "blue": 1, "green": 2},
            id2label={0: "red", 1: "blue", 2: "green"},
        )
    )
    bert.save_pretrained(root / "bert")
    for name in ("t5", "bert"):
        tiny_tokenizer.save_pretrained(root / name)
    return root


def _head_rows(n, seed=0):
    rows = colour_rows(n, seed)
    return [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"],
             "text": r["messages"][0]["content"], "label": r["messages"][1]["content"]} for r in rows]  # fmt: skip


@pytest.mark.parametrize(("task", "targets"), [("seq2seq", "[q, v, o, wi, wo]"), ("classification", "[query, value]")])
def test_seq2seq_and_classification_training(tiny_t5_and_bert, tmp_path, task, targets):
    model_dir = tiny_t5_and_bert / ("t5" if task == "seq2seq" else "bert")
    rows = _head_rows(96)
    if task == "classification":
        rows = [{"text": r["text"], "label": r["label"]} for r in rows]
    else:
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    write_jsonl(tmp_path / "train.jsonl", rows[:80])
    write_jsonl(tmp_path / "eval.jsonl", rows[80:])
    cfg = load_config(None, [
        f"model={model_dir}", f"task={task}", f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'train.jsonl'}",
        f"data.eval={tmp_path / 'eval.jsonl'}", f"lora.target_modules={targets}", "lora.r=8", "train.max_steps=60",
        "train.batch_size=8", "train.lr=3e-2", "train.max_new_tokens=4", "data.max_length=32",
    ])  # fmt: skip
    result = train(cfg, progress=False)
    assert result.eval.loss < result.eval_before.loss
    assert result.eval.exact_match is not None and result.eval.scored == 16
    if task == "classification":
        assert result.eval.exact_match >= 0.5  # 3 classes, chance is 1/3
        saved = json.loads((result.output_dir / "adapter_config.json").read_text())
        assert saved["modules_to_save"] == ["classifier"] and saved["task_type"] == "SEQ_CLS"
        assert any(".classifier." in k for k in _adapter(result.output_dir))
    assert main(["eval", "--model", str(model_dir), "--task", task, "--adapter", str(result.output_dir),
                 "--data", str(tmp_path / "eval.jsonl"), "--json"]) == 0  # fmt: skip


def test_task_row_errors(tiny_t5_and_bert, tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "colour?", "label": "purple"}])
    cfg = load_config(None, [f"model={tiny_t5_and_bert / 'bert'}", "task=classification",
                             f"data.train={tmp_path / 'bad.jsonl'}", f"output_dir={tmp_path / 'o'}"])  # fmt: skip
    with pytest.raises(ValueError, match=r"bad.jsonl:1: label 'purple' is not a class of this model"):
        train(cfg, progress=False)
    write_jsonl(tmp_path / "chat.jsonl", colour_rows(2))
    cfg = load_config(None, [f"model={tiny_t5_and_bert / 't5'}", "task=seq2seq",
                             f"data.train={tmp_path / 'chat.jsonl'}", f"output_dir={tmp_path / 'o2'}"])  # fmt: skip
    with pytest.raises(ValueError, match=r"chat.jsonl:1: seq2seq training needs 'prompt' and 'completion'"):
        train(cfg, progress=False)


def test_lean_cpu_memory_follows_the_config_and_defaults_on_with_checkpointing(run_config, monkeypatch):

    calls = []
    monkeypatch.setattr(trainer_module, "return_freed_memory_to_os", lambda: calls.append(1) or True)
    plain = train(run_config("train.max_steps=2", "train.generate_eval=false", out="plain"), progress=False)
    assert calls == []
    lean = train(
        run_config("train.max_steps=2", "train.generate_eval=false", "train.lean_cpu_memory=true", out="lean"),
        progress=False,
    )
    assert calls == [1]
    a, b = _adapter(plain.output_dir), _adapter(lean.output_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    overrides = ("train.max_steps=1", "train.generate_eval=false", "train.gradient_checkpointing=true")
    train(run_config(*overrides, out="gc"), progress=False)
    assert calls == [1, 1]  # on by default when the run chose memory over speed
    train(run_config(*overrides, "train.lean_cpu_memory=false", out="gc-off"), progress=False)
    assert calls == [1, 1]  # an explicit false wins


def test_adamw_is_fused_where_pytorch_supports_it_with_the_same_updates():
    from lorakit.train.optim import adamw

    torch.manual_seed(0)
    start = torch.randn(40, 7)
    grads = [torch.randn(40, 7) for _ in range(3)]
    results = []
    for make in (
        lambda ps: adamw(ps, lr=0.1, weight_decay=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01),
    ):
        p = torch.nn.Parameter(start.clone())
        opt = make([{"params": [p]}])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results.append((opt.defaults["fused"], p.detach()))
    assert results[0][0] is True and not results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)
    assert not adamw([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], lr=0.1).defaults["fused"]


def test_eval_fraction_reports_the_rows_each_side_has(run_config, capsys):
    """The "train:" line counts the rows that train (after the held-out share), and an "eval:" line follows."""
    result = train(run_config("data.eval=null", "data.eval_fraction=0.25", "train.max_steps=1"), progress=False)
    err = capsys.readouterr().err
    assert "train: 48 rows (48 chat)" in err, err
    assert "eval: 16 rows (16 chat)" in err, err
    assert result.data["train"].rows == 48 and result.data["eval"].rows == 16
    assert result.eval.scored == 16


def test_tokens_per_second_is_per_step_and_the_summary_a_median(run_config, monkeypatch, capsys):
    """One stalled step does not move the reported throughput: each record has its own step's figure and the
    summary is their median."""
    real, calls = loop_module.Loop._step, {"n": 0}

    def stall_once(self, indices):
        calls["n"] += 1
        if calls["n"] == 2:
            time.sleep(1.0)
        return real(self, indices)

    monkeypatch.setattr(loop_module.Loop, "_step", stall_once)
    result = train(run_config("train.eval_before=false", "train.generate_eval=false"), progress=False)
    records = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if r["kind"] == "train"]
    rates = [r["tokens"] / r["seconds"] for r in records]
    assert [r["tokens_per_second"] for r in records] == pytest.approx(rates, rel=0.01, abs=0.1)
    assert result.tokens_per_second == pytest.approx(statistics.median(rates), rel=0.01)
    assert records[1]["tokens_per_second"] < 0.5 * result.tokens_per_second  # the stall shows in its own step only


def test_no_progress_prints_a_line_every_log_every_steps(run_config, capsys):
    train(run_config("train.log_every=5", "train.generate_eval=false"), progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["5/12", "10/12", "12/12"]
    assert all(" loss " in line and " lr " in line and line.endswith(" tokens/s") for line in lines)
    train(run_config("train.log_every=0", "train.generate_eval=false", out="quiet"), progress=False)
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]


def test_epochs_set_the_steps_from_the_training_rows(run_config, capsys):
    result = train(run_config("train.max_steps=null", "train.epochs=1.5", "data.eval=null", "data.eval_fraction=0.25",
                              "train.generate_eval=false"), progress=False)  # fmt: skip
    assert result.steps == 9  # ceil(1.5 x 48 training rows / 8)
    assert "train.epochs=1.5: 9 steps of 8 over 48 training rows" in capsys.readouterr().err
    assert max(r["step"] for r in read_metrics(result.output_dir / "metrics.jsonl")) == 9
    assert json.loads((result.output_dir / "status.json").read_text())["max_steps"] == 9  # the dashboard's total


def test_eval_retention_adds_retention_to_the_final_evaluation(run_config, tmp_path, capsys):
    """train.eval_retention: after training, what the adapter kept of the base (the same model with the adapter
    off) on the given sets: a metrics record, the printed summary, the loss plot's title, the dashboard's row."""
    from lorakit.train.metrics import read_metrics
    from lorakit.ui.runs import Workspace

    write_jsonl(tmp_path / "texts.jsonl", [{"text": f"item {i} is red, blue or green."} for i in range(5)])
    probes = [
        {"question": f"colour of item {i}?", "choices": ["red", "blue", "green"], "answer": i % 3} for i in range(9)
    ]
    write_jsonl(tmp_path / "probes.jsonl", probes)
    cfg = run_config(
        "train.eval_retention=true", f"data.retention_texts={tmp_path / 'texts.jsonl'}",
        f"data.retention_probes={tmp_path / 'probes.jsonl'}", "train.max_steps=4",
    )  # fmt: skip
    result = train(cfg, progress=False)
    records = read_metrics(result.output_dir / "metrics.jsonl")
    (kept,) = [r for r in records if r["kind"] == "retention"]
    assert kept["step"] == 4 and kept["probes"] == 9 and kept["texts"] == 5
    assert kept["kl"] > 0 and 0 <= kept["top1_agreement"] <= 1  # the adapter changed the model
    assert kept["kept"] <= kept["base_right"] and kept["tuned_loss"] != kept["base_loss"]
    assert "retention: " in capsys.readouterr().err  # the run log
    summary = Workspace(tmp_path).summary(result.output_dir.name)
    assert summary["retention"] == kept
