"""The four fine-tuning methods on a tiny model: loss falls, counts match formulas, base untouched, reload exact."""

import json

import pytest
import torch

import lorakit
from lorakit.cli.main import main
from lorakit.methods import METHODS
from lorakit.methods.bottleneck import bottleneck_parameters
from lorakit.tools.compare import FIELDS, build_method, checksum, markdown_table, summarize
from lorakit.train.config import load_config
from lorakit.train.trainer import train

from .conftest import colour_rows, write_jsonl

LRS = {"full": 3e-3, "adapter": 1e-2, "prompt": 5e-2, "lora": 3e-2}


@pytest.fixture
def cfg_for(steerable_lm_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", colour_rows(64))
    write_jsonl(tmp_path / "eval.jsonl", colour_rows(12, seed=1))
    write_jsonl(tmp_path / "texts.jsonl", [{"text": f"item {i} has a colour, and the sky is blue."} for i in range(6)])
    probes = [
        {"question": f"colour of item {i}?", "choices": ["red", "blue", "green"], "answer": i % 3} for i in range(6)
    ]
    write_jsonl(tmp_path / "probes.jsonl", probes)

    def make(*overrides):
        return load_config(
            None,
            [
                f"model={steerable_lm_dir}",
                f"data.train={tmp_path / 'train.jsonl'}",
                f"data.eval={tmp_path / 'eval.jsonl'}",
                f"data.retention_texts={tmp_path / 'texts.jsonl'}",  # small sets: the shipped ones take a minute
                f"data.retention_probes={tmp_path / 'probes.jsonl'}",
                "data.max_length=32",
                "lora.r=4",
                "lora.alpha=8",
                "compare.adapter_size=8",
                "compare.prompt_length=5",
                "compare.prompt_init_text=colour of item",
                "train.batch_size=8",
                "train.max_new_tokens=3",
                f"output_dir={tmp_path / 'out'}",
                "precision=fp32",  # thresholds set on float32 runs; test_precision trains each method in bf16-mixed
                *overrides,
            ],
        )

    return make


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_and_its_loss_falls(cfg_for, name, tmp_path):
    cfg = cfg_for(f"train.lr={LRS[name]}", "train.max_steps=15", f"output_dir={tmp_path / name}", "overwrite=true")
    _, tokenizer = lorakit.load_model(cfg.model)
    result = train(cfg, progress=False, method=build_method(cfg, name, tokenizer))
    losses = [json.loads(line)["loss"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]  # fmt: skip
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # each method drops it by 16 % or more here
    assert result.eval.loss < result.eval_before.loss


def test_trainable_counts_equal_formulas(cfg_for):
    cfg = cfg_for()
    model, tokenizer = lorakit.load_model(cfg.model)
    d, layers, total = (
        model.config.hidden_size,
        model.config.num_hidden_layers,
        sum(p.numel() for p in model.parameters()),
    )
    inter, kv = (
        model.config.intermediate_size,
        model.config.num_key_value_heads * (d // model.config.num_attention_heads),
    )
    expected = {
        "full": total,
        "adapter": bottleneck_parameters(d, 8, layers),
        "prompt": 5 * d,
        # r * (d_in + d_out) for q, k, v, o, gate, up, down in every layer
        "lora": layers * 4 * ((d + d) + (d + kv) + (d + kv) + (d + d) + (d + inter) * 2 + (inter + d)),
    }
    for name, want in expected.items():
        fresh, _ = lorakit.load_model(cfg.model)
        assert _trainable(build_method(cfg, name, tokenizer).prepare(fresh)) == want, name


@pytest.mark.parametrize("name", list(METHODS))
def test_base_weights_untouched_except_full_and_reload_reproduces(cfg_for, name, tmp_path):
    cfg = cfg_for(f"train.lr={LRS[name]}", "train.max_steps=3", "train.generate_eval=false")
    model, tokenizer = lorakit.load_model(cfg.model)
    originals = list(model.parameters())
    before = checksum(originals)
    method = build_method(cfg, name, tokenizer)
    prepared = method.prepare(model)
    opt = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=LRS[name])
    ids = torch.tensor([tokenizer("colour of item 3? blue")["input_ids"]] * 2)
    for _ in range(3):
        prepared(input_ids=ids).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert (checksum(originals) != before) == (name == "full")
    method.save(prepared, tmp_path / "saved")
    fresh, _ = lorakit.load_model(cfg.model)
    restored = method.restore(build_method(cfg, name, tokenizer).prepare(fresh), tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, prepared(input_ids=ids).logits, rtol=0, atol=0)


def test_compare_writes_every_field(cfg_for, tmp_path, capsys):
    overrides = [arg for o in ("train.max_steps=4", "train.lr=1e-2", f"output_dir={tmp_path / 'cmp'}",
                               *_cfg_overrides(cfg_for())) for arg in ("--set", o)]  # fmt: skip
    assert main(["compare", "--no-progress", "--methods", "prompt,lora", *overrides]) == 0
    records = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [r["method"] for r in records] == ["prompt", "lora"]
    for r in records:
        assert set(r) == set(FIELDS) and r["status"] == "ok" and r["error"] is None
        assert r["peak_memory_mb"] > 0 and r["median_step_seconds"] > 0 and r["artifact_bytes"] > 0
        assert r["base_weights_changed"] is False
        assert 0 <= r["retention_kept"] <= 1 and r["retention_kl"] > 0  # both methods change the model
    assert records[0]["exact_match_before"] is not None  # the first method's worker measures the base
    assert records[1]["latency_merged_vs_base"] is not None
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "| prompt tuning |" in table and "| LoRA |" in table
    assert (tmp_path / "cmp" / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_over_seeds_gives_mean_spread_and_retention(cfg_for, tmp_path):
    """--seeds 2: every method twice (seeds 0 and 1) in its own folder, each run's retention measured against a
    fresh base; the table gives mean ± standard deviation over the seeds."""
    overrides = [arg for o in ("train.max_steps=3", "train.lr=1e-2", f"output_dir={tmp_path / 'cmp'}",
                               *_cfg_overrides(cfg_for())) for arg in ("--set", o)]  # fmt: skip
    assert main(["compare", "--no-progress", "--methods", "lora", "--seeds", "2", *overrides]) == 0
    records = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [(r["method"], r["seed"], r["status"]) for r in records] == [("lora", 0, "ok"), ("lora", 1, "ok")]
    assert (tmp_path / "cmp" / "lora" / "seed-0" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "cmp" / "lora" / "seed-1" / "adapter_model.safetensors").is_file()
    assert records[0]["eval_loss"] != records[1]["eval_loss"]  # another seed, another run
    for r in records:
        assert 0 <= r["retention_kept"] <= 1 and r["retention_kl"] > 0 and 0 < r["retention_top1"] <= 1
    (row,) = summarize(records)
    losses = [r["eval_loss"] for r in records]
    assert row["eval_loss"] == pytest.approx(sum(losses) / 2)
    assert row["eval_loss_sd"] == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5)
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert f"{row['eval_loss']:.4f} ± {row['eval_loss_sd']:.4f}" in table
    assert "Each method trained 2 times (seeds 0, 1)" in table and "| retention (probes kept) |" in table
    steps = [r["median_step_seconds"] for r in records]
    assert row["median_step_seconds"] == pytest.approx(sum(steps) / 2)  # the footnote says: means over the seeds
    assert f"| {row['median_step_seconds']:.2f} s |" in table and "median step are means over the seeds" in table


def test_summarize_gives_mean_sd_and_range_of_what_varies_and_counts_failures():
    base = {"method": "lora", "status": "ok", "median_step_seconds": 1.0, "peak_memory_mb": 10.0,
            "retention_kept": None, "base_weights_changed": False}  # fmt: skip
    records = [
        {**base, "seed": 0, "exact_match": 0.90, "eval_loss": 0.3},
        {**base, "seed": 1, "exact_match": 0.96, "eval_loss": 0.1},
        {**base, "seed": 2, "exact_match": 0.93, "eval_loss": 0.2},
        {"method": "lora", "seed": 3, "status": "failed", "error": "boom"},
        {"method": "full", "seed": 0, "status": "failed", "error": "OOM"},
    ]
    lora, full = summarize(records)
    assert lora["runs"] == 3 and lora["seeds"] == [0, 1, 2, 3] and lora["status"] == "ok"
    assert lora["exact_match"] == pytest.approx(0.93) and lora["exact_match_sd"] == pytest.approx(0.03)
    assert (lora["eval_loss_min"], lora["eval_loss_max"]) == (0.1, 0.3)
    assert lora["retention_kept"] is None and lora["retention_kept_sd"] is None
    assert lora["error"] == "1 of 4 runs failed: boom"
    assert full["status"] == "failed" and full["runs"] == 0 and full["error"] == "OOM"


def _cfg_overrides(cfg) -> list[str]:
    return [f"model={cfg.model}", f"data.train={cfg.data.train}", f"data.eval={cfg.data.eval}", "data.max_length=32",
            f"data.retention_texts={cfg.data.retention_texts}", f"data.retention_probes={cfg.data.retention_probes}",
            "lora.r=4", "compare.prompt_length=5", "train.max_new_tokens=3"]  # fmt: skip


def test_unknown_method_is_a_clear_error(capsys):
    assert main(["compare", "--methods", "lora,qlora"]) == 2
    assert "unknown method(s) ['qlora']: choose from full, adapter, prompt, lora" in capsys.readouterr().err


def test_failed_method_is_reported_in_the_table():
    records = [
        {"method": "full", "status": "failed", "error": "OutOfMemoryError: ..."},
        {
            "method": "lora",
            "status": "ok",
            "trainable_params": 10,
            "trainable_percent": 1.0,
            "peak_memory_mb": 5.0,
            "median_step_seconds": 0.5,
            "tokens_per_second": 9.0,
            "eval_loss": 0.1,
            "exact_match": 0.9,
            "exact_match_before": 0.1,
            "artifact_bytes": 2048,
            "latency_vs_base": 1.05,
            "latency_merged_vs_base": 1.0,
            "base_weights_changed": False,
        },
    ]
    table = markdown_table(records)
    assert "| full fine-tuning | failed: OutOfMemoryError" in table
    assert "| LoRA | 10 (1.00 %) | 5 MB | 0.50 s | 9 | 0.1000 | 90.0% | 2 KiB | 1.05x (1.00x merged) | no |" in table
