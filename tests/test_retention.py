"""`lorakit eval --retention` (issue 33): drift on general text and kept knowledge on probes, tuned against base."""

from __future__ import annotations

import json
import re

import pytest
import torch

import lorakit
from lorakit.cli.main import main
from lorakit.train import retention
from lorakit.train.retention import Probe, load_probes, load_texts, measure_retention

from .conftest import randomize_adapters, write_jsonl

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SUMMARY = re.compile(
    r"^retention: \d+\.\d % of \d+ probes kept \(KL [0-9.e+-]+ nats/token, top-1 agreement \d+\.\d % over [\d,]+ "
    r"tokens\)$"
)
TEXTS = [
    "the colour of item 3 is red and the colour of item 4 is blue",
    "item 12 is green, item 7 is red",
    "red blue green red blue green",
    "the colour of item 40 is",
]
PROBES = [
    Probe(f"what is the colour of item {i}?", ("red", "blue", "green", "the colour")[: 2 + i % 3], i % 2, f"p{i}")
    for i in range(24)
]


def _adapted(directory, scale: float = 0.1, seed: int = 123):
    model, tokenizer = lorakit.load_model(directory)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TARGETS, init="random"))
    randomize_adapters(model, seed=seed, scale=scale)
    return model, tokenizer


def _reference_drift(base, tuned, tokenizer, texts) -> tuple[float, float, int]:
    """(mean KL, top-1 agreement, positions) from the models' whole logits, one text at a time."""
    kl = agree = count = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            lb = base(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            lt = tuned(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            kl += torch.nn.functional.kl_div(lt, lb, log_target=True, reduction="sum").item()
            agree += (lb.argmax(-1) == lt.argmax(-1)).sum().item()
            count += lb.shape[0]
    return kl / count, agree / count, int(count)


# ----- the measure ---------------------------------------------------------------------------------------------
def test_the_base_against_itself_keeps_everything_with_zero_drift(tiny_lm_dir):
    model, tokenizer = lorakit.load_model(tiny_lm_dir)
    report = measure_retention(model, model, tokenizer, TEXTS, PROBES, batch_size=3)
    assert report.base_right > 0 and report.kept == report.base_right == report.tuned_right
    assert report.kept_share == 1.0 and report.lost == []
    assert report.kl == 0.0 and report.agreement == 1.0
    assert report.tokens == sum(len(tokenizer(t)["input_ids"]) - 1 for t in TEXTS)
    assert report.base_loss == report.tuned_loss
    assert report.summary().startswith(f"retention: 100.0 % of {report.base_right} probes kept (KL 0 nats/token, ")
    assert SUMMARY.match(report.summary()), report.summary()


def test_a_new_adapter_with_b_zero_is_the_base_on_one_loaded_model(tiny_lm_dir):
    """base_model=None: the base is the same model with its adapter off; B = 0 changes nothing."""
    model, tokenizer = lorakit.load_model(tiny_lm_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TARGETS))  # B starts at zero
    report = measure_retention(None, model, tokenizer, TEXTS, PROBES)
    assert report.kl < 1e-6 and report.agreement == 1.0 and report.kept_share == 1.0


def test_drift_matches_whole_logits_and_the_adapter_toggle_matches_a_second_model(tiny_lm_dir, monkeypatch):
    """KL and agreement equal those of the whole logits, with the head run a few positions at a time, and one
    model with its adapter switched off gives what a separately loaded base gives."""
    monkeypatch.setattr(retention, "CHUNK", 5)
    tuned, tokenizer = _adapted(tiny_lm_dir, scale=0.3)
    base, _ = lorakit.load_model(tiny_lm_dir)
    kl, agree, count = _reference_drift(base, tuned, tokenizer, TEXTS)
    toggled = measure_retention(None, tuned, tokenizer, TEXTS, PROBES, batch_size=3)
    two = measure_retention(base, tuned, tokenizer, TEXTS, PROBES, batch_size=2)
    assert kl > 1e-3 and agree < 1.0  # the adapter visibly moves the model
    for report in (toggled, two):
        assert report.tokens == count
        assert report.kl == pytest.approx(kl, rel=1e-4)
        assert report.agreement == pytest.approx(agree)
    assert [(d.base_choice, d.tuned_choice) for d in toggled.details] == [
        (d.base_choice, d.tuned_choice) for d in two.details
    ]
    assert lorakit.active_adapters(tuned) == ["default"]  # switched back on afterwards


def test_probes_are_ranked_by_the_answer_tokens_log_likelihood(tiny_lm_dir):
    model, tokenizer = lorakit.load_model(tiny_lm_dir)
    probe = PROBES[5]
    report = measure_retention(model, model, tokenizer, TEXTS[:1], [probe])
    totals = []
    with torch.no_grad():
        prompt = tokenizer(retention.PROMPT.format(question=probe.question))["input_ids"]
        for choice in probe.choices:
            ids = prompt + tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            logps = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            totals.append(sum(logps[k - 1, ids[k]].item() for k in range(len(prompt), len(ids))))
    assert report.details[0].base_choice == max(range(len(totals)), key=totals.__getitem__)


def test_a_model_without_adapters_needs_its_base(tiny_lm_dir):
    model, tokenizer = lorakit.load_model(tiny_lm_dir)
    with pytest.raises(ValueError, match="it has no adapters; pass the base model"):
        measure_retention(None, model, tokenizer, TEXTS, PROBES)


# ----- the sets ------------------------------------------------------------------------------------------------
def test_the_shipped_sets_load():
    texts, probes = load_texts(), load_probes()
    assert 150 <= len(texts) <= 400 and all(len(t) >= 200 for t in texts)
    assert 250 <= len(probes) <= 500
    assert all(2 <= len(p.choices) <= 4 and 0 <= p.answer < len(p.choices) for p in probes)
    assert len({p.id for p in probes}) == len(probes)
    assert len({p.answer for p in probes}) > 1  # the right answer is not always in one place
    assert (retention.DATA / "README.md").is_file() and (retention.DATA / "LICENSE-PSF.txt").is_file()


@pytest.mark.parametrize(
    ("what", "line", "words"),
    [
        ("texts", "not json", "line 2 is not JSON"),
        ("texts", '["a list"]', "line 2 is list, not an object"),
        ("texts", '{"body": "x"}', "line 2 has no 'text' field"),
        ("texts", '{"text": ""}', "line 2 has an empty or non-string 'text'"),
        ("probes", '{"choices": ["a", "b"], "answer": 0}', "line 2 needs a non-empty 'question'"),
        ("probes", '{"question": "q?", "choices": ["a"], "answer": 0}', "'choices' must be a list of two or more"),
        ("probes", '{"question": "q?", "choices": ["a", "a"], "answer": 0}', "two or more different"),
        ("probes", '{"question": "q?", "choices": ["a", "b"], "answer": 2}', "'answer' 2 is neither the index"),
        ("probes", '{"question": "q?", "choices": ["a", "b"], "answer": "c"}', "'answer' 'c' is neither"),
        ("probes", '{"question": "q?", "choices": ["a", "b"], "answer": true}', "'answer' True is neither"),
    ],
)
def test_a_bad_line_is_one_error_naming_the_file_the_line_and_the_fix(tmp_path, what, line, words):
    good = '{"text": "fine"}' if what == "texts" else '{"question": "q?", "choices": ["a", "b"], "answer": "b"}'
    path = tmp_path / f"{what}.jsonl"
    path.write_text(f"{good}\n{line}\n")
    load = load_texts if what == "texts" else load_probes
    with pytest.raises(ValueError) as err:
        load(path, what=f"--retention-{what}")
    message = str(err.value)
    assert message.startswith(f"--retention-{what} {path}: ") and words in message, message


def test_missing_and_empty_files_and_answers_given_as_text(tmp_path):
    with pytest.raises(ValueError, match="no such file; give a JSONL file"):
        load_texts(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="the file has no rows"):
        load_probes(tmp_path / "empty.jsonl")
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q?", "choices": ["a", "b", "c"], "answer": "c"}])
    assert load_probes(path) == [Probe("q?", ("a", "b", "c"), 2)]


# ----- the command line ----------------------------------------------------------------------------------------
@pytest.fixture
def sets(tmp_path):
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    probes = write_jsonl(
        tmp_path / "probes.jsonl",
        [{"question": p.question, "choices": list(p.choices), "answer": p.answer, "id": p.id} for p in PROBES],
    )
    return ["--retention", "--retention-texts", str(texts), "--retention-probes", str(probes), "--no-progress"]


@pytest.fixture
def adapter_dir(tiny_lm_dir, tmp_path):
    model, _ = _adapted(tiny_lm_dir, scale=0.3)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_cli_prints_the_summary_line_and_the_counts(tiny_lm_dir, adapter_dir, sets, capsys):
    assert main(["eval", "--model", str(tiny_lm_dir), "--adapter", str(adapter_dir), *sets, "--precision", "fp32"]) == 0
    out, err = capsys.readouterr()
    summary, counts = out.strip().splitlines()
    assert SUMMARY.match(summary), summary
    assert counts.startswith("  probes: base right ") and "general text: 4 passages, loss" in counts
    assert "against the same model with the adapter off, on 4 texts and 24 probes" in err


def test_cli_json_has_a_retention_object_and_data_too_when_asked(tiny_lm_dir, adapter_dir, sets, tmp_path, capsys):
    from .conftest import colour_rows

    model = ["--model", str(tiny_lm_dir), "--adapter", str(adapter_dir), "--precision", "fp32"]
    assert main(["eval", *model, *sets, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert list(record) == ["retention"]
    fields = {"kept_share", "probes", "base_right", "tuned_right", "kept", "kl", "top1_agreement", "tokens", "texts",
              "base_loss", "tuned_loss", "lost"}  # fmt: skip
    assert set(record["retention"]) == fields
    got = record["retention"]
    assert got["probes"] == 24 and got["texts"] == 4 and got["kl"] > 0 and 0 <= got["top1_agreement"] <= 1
    assert got["kept"] == got["base_right"] - len(got["lost"])
    rows = write_jsonl(tmp_path / "rows.jsonl", colour_rows(4, seed=1))
    assert main(["eval", *model, *sets, "--json", "--data", str(rows), "--no-generate"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "retention"} <= set(both) and both["retention"]["kl"] == pytest.approx(got["kl"])
    assert main(["eval", *model, *sets, "--data", str(rows), "--no-generate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("rows 4  loss ") and SUMMARY.match(lines[1])


def test_cli_compares_a_merged_model_directory_with_its_base(tiny_lm_dir, adapter_dir, sets, tmp_path, capsys):
    """--model DIR (merged) --base MODEL gives the figures of --adapter on the base; a fully fine-tuned run's
    config.yaml names the base when --base is left out."""
    common = [*sets, "--json", "--precision", "fp32"]
    assert main(["eval", "--model", str(tiny_lm_dir), "--adapter", str(adapter_dir), *common]) == 0
    adapter = json.loads(capsys.readouterr().out)["retention"]
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_lm_dir), "--adapter", str(adapter_dir), "--out", str(merged)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(merged), "--base", str(tiny_lm_dir), *common]) == 0
    two = json.loads(capsys.readouterr().out)["retention"]
    assert two["kl"] == pytest.approx(adapter["kl"], rel=1e-3)
    assert two["tokens"] == adapter["tokens"] and two["kept"] == adapter["kept"]
    assert main(["eval", "--model", str(merged), *common]) == 2
    err = capsys.readouterr().err
    assert "records no base model" in err and "name it with --base MODEL" in err
    (merged / "config.yaml").write_text(f"model: {tiny_lm_dir}\nmethod: full\n")
    assert main(["eval", "--model", str(merged), *common]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["retention"]["kl"] == pytest.approx(two["kl"]) and "recorded in" in err
    assert main(["eval", "--model", str(tiny_lm_dir), "--base", str(tiny_lm_dir), *common]) == 0
    itself = json.loads(capsys.readouterr().out)["retention"]
    assert itself["kl"] == 0 and itself["kept_share"] == 1.0 and itself["top1_agreement"] == 1.0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "give --data (a dataset to evaluate on), --retention"),
        (["--retention-texts", "t.jsonl", "--data", "d.jsonl"], "--retention-texts is an option of --retention"),
        (["--retention"], "--retention compares a tuned model with its base: give --adapter DIR, or --model DIR"),
        (["--retention", "--adapter", "a", "--base", "b"], "--base is the base of a merged or fully fine-tuned"),
        (["--retention", "--model", "m", "--task", "seq2seq"], "--task seq2seq is not one"),
        (["--retention", "--model", "m", "--base", "b", "--retention-probes", "nope.jsonl"], "--retention-probes"),
    ],
)
def test_cli_option_errors_are_one_line(args, words, capsys):
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit eval: error: ") and words in err and err.count("\n") == 1, err


def test_cli_refuses_a_bad_probe_file_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "probes.jsonl"
    bad.write_text('{"question": "q?", "choices": ["a", "b"], "answer": 5}\n')
    assert main(["eval", "--model", str(tmp_path / "nowhere"), "--base", "x", "--retention", "--retention-probes",
                 str(bad)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit eval: error: --retention-probes {bad}: line 1: 'answer' 5 is neither"), err


# ----- the measure discriminates (the embedded model) ----------------------------------------------------------
@pytest.mark.integration
def test_an_adapter_with_b_scaled_up_until_the_model_breaks_scores_far_below_a_sane_one():
    """On the embedded SmolLM2 and a slice of the shipped sets: a fresh adapter with small random B keeps nearly
    everything; the same adapter with B scaled up x1000 answers the probes at about chance and drifts far more."""
    from lorakit.precision import decide

    precision = decide("auto", "cpu")
    model, tokenizer = lorakit.load_model("default", dtype=precision.storage)
    lorakit.inject(model, lorakit.LoraConfig(r=8, target_modules="all-linear"), adapter_dtype=precision.trained)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    texts, probes = load_texts()[:4], load_probes()[::10]  # every category
    with precision.context("cpu"):
        sane = measure_retention(None, model, tokenizer, texts, probes)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(1000)
        broken = measure_retention(None, model, tokenizer, texts, probes)
    assert sane.base_right == broken.base_right >= 12  # the base answers more than half right
    assert sane.kept_share >= 0.9 and sane.kl < 0.05 and sane.agreement > 0.9, sane.summary()
    assert broken.kept_share <= sane.kept_share - 0.4 and broken.kl > 1.0 and broken.agreement < 0.5, broken.summary()
