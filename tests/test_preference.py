"""Preference tuning (objective: dpo | orpo): data, the losses against TRL's, and training runs."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.data import IGNORE, collate_pairs, read_rows, tokenize_pairs
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.config import load_config
from lorakit.train.objectives import DPO, ORPO, dpo_loss, reference_mode, sequence_logps
from lorakit.train.trainer import train

from .conftest import interrupt_at, torchrun_train, write_jsonl

COLOURS = ("red", "blue", "green")


def preference_rows(n: int, seed: int = 0, chat: bool = True) -> list[dict]:
    """The colour task as preferences: the item's colour is chosen, another colour rejected."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randrange(12)
        good, bad = COLOURS[i % 3], COLOURS[(i + 1 + rng.randrange(2)) % 3]
        prompt = [{"role": "user", "content": f"colour of item {i}?"}] if chat else f"colour of item {i}?"
        rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


@pytest.fixture
def pref_config(steerable_lm_dir, tmp_path):
    """make(*overrides, out=...): a DPO config on tiny_lm_dir with the colour preferences."""
    write_jsonl(tmp_path / "pairs.jsonl", preference_rows(48))
    write_jsonl(tmp_path / "pairs-eval.jsonl", preference_rows(12, seed=1))

    def make(*overrides, out="run"):
        base = [
            f"model={steerable_lm_dir}", f"output_dir={tmp_path / out}", f"data.train={tmp_path / 'pairs.jsonl'}",
            f"data.eval={tmp_path / 'pairs-eval.jsonl'}", "data.max_length=32", "objective=dpo", "dpo.beta=0.5",
            "lora.r=4", "lora.alpha=8", "train.max_steps=6", "train.batch_size=4", "train.lr=2e-2",
            "precision=fp32",  # the equivalence tests compare adapters to 1e-5: float32, whatever this CPU has
        ]  # fmt: skip
        return load_config(None, base + list(overrides))

    return make


def _adapter(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _records(directory) -> list[dict]:
    return [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]


# ----- data ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [True, False])
def test_pairs_share_the_prompt_and_carry_loss_on_the_answer_only(tiny_tokenizer, chat):
    rows = [(f"f.jsonl:{i + 1}", r) for i, r in enumerate(preference_rows(3, chat=chat))]
    pairs, stats = tokenize_pairs(rows, tiny_tokenizer, 64)
    assert stats.rows == 3 and stats.kinds == {("chat" if chat else "prompt"): 3}
    for pair, (_, row) in zip(pairs, rows, strict=True):
        start = pair.chosen.answer_start
        assert start == pair.rejected.answer_start > 0
        assert pair.chosen.input_ids[:start] == pair.rejected.input_ids[:start]
        for example, text in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            assert example.labels[:start] == [IGNORE] * start
            answer = [t for t in example.labels[start:] if t != IGNORE]
            assert tiny_tokenizer.decode(answer).startswith(text)
            assert tiny_tokenizer.eos_token_id in answer  # the end of turn is part of the answer
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6
    assert batch["input_ids"][0].tolist()[: len(pairs[0].chosen.input_ids)] == pairs[0].chosen.input_ids
    assert batch["input_ids"][3].tolist()[: len(pairs[0].rejected.input_ids)] == pairs[0].rejected.input_ids


def test_chat_answers_as_message_lists_and_multi_turn_prompts(tiny_tokenizer):
    prompt = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "colour of item 1?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "and item 2?"},
    ]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "green"}], "rejected": "red"}
    [pair], _ = tokenize_pairs([("x.jsonl:1", row)], tiny_tokenizer, 128)
    labelled = [t for t in pair.chosen.labels if t != IGNORE]
    assert tiny_tokenizer.decode(labelled).startswith("green")  # the earlier assistant turn carries no loss
    assert "blue" not in tiny_tokenizer.decode(labelled)


def test_preference_rows_from_csv_parquet_and_a_saved_dataset(tiny_tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = preference_rows(4)
    with open(tmp_path / "p.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "prompt": json.dumps(r["prompt"])})  # chat prompts as JSON text in a cell
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    want, _ = tokenize_pairs(read_rows(write_jsonl(tmp_path / "p.jsonl", rows)), tiny_tokenizer, 64)
    for source in ("p.csv", "p.parquet", "saved"):
        got, stats = tokenize_pairs(read_rows(tmp_path / source), tiny_tokenizer, 64)
        assert stats.kinds == {"chat": 4}, source
        assert [(p.chosen.input_ids, p.rejected.input_ids) for p in got] == [
            (p.chosen.input_ids, p.rejected.input_ids) for p in want
        ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "hi", "chosen": "a"}, r"bad.jsonl:1: preference rows need .* missing \['rejected'\]"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"bad.jsonl:1: .*Rows of text, prompt/completion or mess"),
        ({"prompt": "hi", "chosen": "same", "rejected": "same"}, r"bad.jsonl:1: 'chosen' and 'rejected' are the same"),
        ({"prompt": "hi", "chosen": 3, "rejected": "b"}, r"bad.jsonl:1: 'chosen' must be a string or a list"),
        (
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "b",
             "rejected": "c"},
            r"bad.jsonl:1: the prompt ends with an assistant turn",
        ),
        (
            {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "b"}],
             "rejected": "c"},
            r"bad.jsonl:1: 'chosen' must be a string or a list with one \{'role': 'assistant'",
        ),
        ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "b", "rejected": "c"}, r"bad.jsonl:1: 'prompt'"),
    ],
)  # fmt: skip
def test_malformed_preference_rows_name_file_line_and_problem(tiny_tokenizer, tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ValueError, match=message):
        tokenize_pairs(read_rows(path), tiny_tokenizer, 64)


def test_too_long_pairs_keep_the_prompt_end_and_the_answers_start(tiny_tokenizer):
    long_prompt = " ".join(f"item {i}" for i in range(60))
    row = {"prompt": long_prompt, "chosen": "red " * 30, "rejected": "blue"}
    [pair], stats = tokenize_pairs([("f:1", row)], tiny_tokenizer, 40)
    assert stats.truncated == 1
    assert len(pair.chosen.input_ids) == 40 and len(pair.rejected.input_ids) <= 40
    start = pair.chosen.answer_start
    assert start == pair.rejected.answer_start and start >= 1
    assert pair.chosen.input_ids[:start] == pair.rejected.input_ids[:start]
    assert tiny_tokenizer.decode(pair.chosen.input_ids[:start]).endswith("item 59")  # the prompt's end is kept
    assert any(t != IGNORE for t in pair.rejected.labels)


# ----- the losses against TRL ---------------------------------------------------------------------------
def _peft_and_lorakit(lm_dir, tmp_path):
    """The same random LoRA adapter on the same base: as a PEFT model and as a lorakit model."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = PeftLora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(lm_dir), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours, _ = lorakit.load_model(str(lm_dir))
    lorakit.load_adapter(ours, tmp_path / "adapter", trainable=True)
    return peft_model, ours


def _grads(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        n.removeprefix(prefix).replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad
    }


MIXED_PAIRS = [
    {"prompt": "colour of item 1?", "chosen": "red", "rejected": "blue"},
    {"prompt": "colour of item 2?", "chosen": "green it is", "rejected": "red"},
    {"prompt": "colour of item 13?", "chosen": "blue", "rejected": "green red blue"},
]


@pytest.mark.parametrize(
    ("loss_type", "beta", "sft_weight"), [("sigmoid", 0.3, 0.0), ("ipo", 0.2, 0.0), ("sigmoid", 0.3, 0.7)]
)
def test_dpo_and_ipo_loss_and_gradients_equal_trl(
    steerable_lm_dir, tiny_tokenizer, tmp_path, loss_type, beta, sft_weight
):
    """sft_weight: DPO plus the chosen answers' NLL, TRL's loss_type [sigmoid, sft] with loss_weights [1, w]."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    peft_model, ours = _peft_and_lorakit(steerable_lm_dir, tmp_path)
    losses = (
        {"loss_type": [loss_type, "sft"], "loss_weights": [1.0, sft_weight]}
        if sft_weight
        else {"loss_type": [loss_type]}
    )
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=beta, **losses, report_to=[], use_cpu=True, per_device_train_batch_size=3,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=peft_model, args=args, train_dataset=Dataset.from_list(MIXED_PAIRS), processing_class=tiny_tokenizer
    )
    if "ref" in trainer.model.peft_config:  # TRL's reference for a pretrained adapter is a copy of it; ours: the base
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    pairs, _ = tokenize_pairs([(str(i), r) for i, r in enumerate(MIXED_PAIRS)], tiny_tokenizer, 64)
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")} | {"completion_mask": batch["labels"].ne(IGNORE)}
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    theirs.backward()
    cfg = load_config(
        None,
        [f"model={steerable_lm_dir}", "objective=dpo", f"dpo.beta={beta}", f"dpo.loss_type={loss_type}",
         f"dpo.sft_weight={sft_weight}"],
    )  # fmt: skip
    objective = DPO(cfg)
    mine, stats = objective.loss(
        ours, ours, pairs, tiny_tokenizer.pad_token_id, torch.device("cpu"), objective.units(pairs)
    )
    mine.backward()
    assert abs(mine.item() - theirs.item()) <= 1e-5 and mine.item() > 1e-3
    want, got = _grads(trainer.model, "base_model.model."), _grads(ours)
    assert want.keys() == got.keys() and len(got) == 12
    assert _max_diff(got, want) <= 1e-5
    assert max(g.abs().max().item() for g in got.values()) > 1e-3  # gradients that say something
    metrics = trainer._metrics["train"]
    assert stats["rewards_chosen"].item() / 3 == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-5)
    assert stats["margin"].item() / 3 == pytest.approx(metrics["rewards/margins"][-1], abs=1e-5)
    assert stats["accuracy"].item() / 3 == pytest.approx(metrics["rewards/accuracies"][-1])


def test_orpo_loss_and_gradients_equal_trl_odds_ratio_plus_the_answers_nll(steerable_lm_dir, tiny_tokenizer, tmp_path):
    """TRL's ORPO takes its NLL over prompt and answer; lorakit's over the answer, as the ORPO paper writes it.
    The odds-ratio part is TRL's own code (get_batch_logps, odds_ratio_loss) on the PEFT model's logits."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    peft_model, ours = _peft_and_lorakit(steerable_lm_dir, tmp_path)
    pairs, _ = tokenize_pairs([(str(i), r) for i, r in enumerate(MIXED_PAIRS)], tiny_tokenizer, 64)
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    peft_model.train()
    logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio_losses, *_ = ORPOTrainer.odds_ratio_loss(fake, logps[:3], logps[3:])
    chosen_logits, chosen_labels = logits[:3, :-1], batch["labels"][:3, 1:]
    nll = torch.nn.functional.cross_entropy(chosen_logits.reshape(-1, logits.shape[-1]), chosen_labels.reshape(-1))
    theirs = nll - ratio_losses.mean()
    theirs.backward()
    objective = ORPO(load_config(None, [f"model={steerable_lm_dir}", "objective=orpo", "dpo.beta=0.25"]))
    mine, stats = objective.loss(
        ours, ours, pairs, tiny_tokenizer.pad_token_id, torch.device("cpu"), objective.units(pairs)
    )
    mine.backward()
    assert abs(mine.item() - theirs.item()) <= 1e-5
    assert _max_diff(_grads(ours), _grads(peft_model, "base_model.model.")) <= 1e-5
    assert stats["nll"].item() / objective.units(pairs)["chosen_tokens"] == pytest.approx(nll.item(), abs=1e-5)


def test_label_smoothing_is_conservative_dpo():
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=gen) * 3 for _ in range(4))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.1)
    d = 0.2 * ((pc - rc) - (pr - rr))
    want = -0.9 * torch.log(torch.sigmoid(d)) - 0.1 * torch.log(torch.sigmoid(-d))
    torch.testing.assert_close(losses, want)
    torch.testing.assert_close(chosen - rejected, d)
    plain, *_ = dpo_loss(pc, pr, rc, rr, beta=0.2)
    torch.testing.assert_close(plain, -torch.log(torch.sigmoid(d)))


# ----- training -----------------------------------------------------------------------------------------
def test_dpo_starts_at_log_2_learns_and_logs_its_metrics(pref_config):
    result = train(pref_config("train.eval_every=3", "train.max_steps=12"), progress=False)
    records = _records(result.output_dir)
    steps = [r for r in records if r["kind"] == "train"]
    assert abs(steps[0]["loss"] - math.log(2)) <= 1e-7  # B = 0: the trained model is the reference
    for key in ("rewards_chosen", "rewards_rejected", "margin", "accuracy", "prefers_chosen", "grad_norm"):
        assert all(key in r for r in steps), key
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6, 9, 12]
    assert evals[0]["loss"] == pytest.approx(math.log(2))
    assert evals[-1]["accuracy"] > 0.5 and evals[-1]["margin"] > 0.2 and evals[-1]["loss"] < math.log(2) - 0.1
    assert (
        result.eval.accuracy == evals[-1]["accuracy"]
        and result.eval_before.prefers_chosen == evals[0]["prefers_chosen"]
    )
    assert (result.output_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model, _ = lorakit.load_model(str(pref_config().model))
    lorakit.load_adapter(model, result.output_dir)  # an ordinary adapter


def test_reference_log_probs_do_not_change_during_training(pref_config, tiny_tokenizer, monkeypatch):
    """Every reference value a step used equals, bit for bit, the reference of the trained model at the end,
    and the frozen base's log-probabilities (to float rounding: fused forwards)."""
    from lorakit.train import objectives

    seen = []
    real = objectives.reference_logps

    def recording(model, pairs, batch):
        values = real(model, pairs, batch)
        seen.append(({k: v.clone() for k, v in batch.items()}, values.clone()))
        return values

    monkeypatch.setattr(objectives, "reference_logps", recording)
    result = train(pref_config("train.max_steps=8"), progress=False)
    base, _ = lorakit.load_model(str(pref_config().model))
    # steps, and the evaluations before and after (train.eval_batch_size unset: a training forward's 4 pairs)
    assert len(seen) == 8 + 2 * math.ceil(12 / 4)
    for batch, during in seen:
        with reference_mode(result.model):
            after = sequence_logps(result.model, result.model, batch)[0]
        trained = sequence_logps(result.model, result.model, batch)[0].detach()
        with torch.no_grad():
            plain = sequence_logps(base, base, batch)[0]
        assert torch.equal(during, after)
        torch.testing.assert_close(during, plain, rtol=1e-5, atol=1e-5)
        assert (trained - during).abs().max() > 1e-3  # while the trained model moved


def test_precomputed_reference_gives_the_same_adapter(pref_config):
    live = train(pref_config(out="live"), progress=False)
    pre = train(pref_config("dpo.precompute_reference=true", out="pre"), progress=False)
    assert _max_diff(_adapter(live.output_dir), _adapter(pre.output_dir)) <= 1e-6


def test_dpo_resume_matches_the_uninterrupted_run(pref_config, monkeypatch):
    straight = train(pref_config("train.save_every=2", out="straight"), progress=False)
    restore = interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(pref_config("train.save_every=2", "dpo.precompute_reference=true", out="resumed"), progress=False)
    restore()
    resumed = pref_config("train.save_every=2", "dpo.precompute_reference=true", out="resumed")
    assert list_checkpoints(Path(resumed.output_dir) / "checkpoints")[-1].name == "step-0000003"
    train(resumed, resume=True, progress=False)
    assert _max_diff(_adapter(straight.output_dir), _adapter(resumed.output_dir)) <= 1e-6


def test_orpo_trains_without_a_reference(pref_config):
    result = train(pref_config("objective=orpo", "dpo.beta=1.0", "train.max_steps=12"), progress=False)
    evals = [r for r in _records(result.output_dir) if r["kind"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"] and evals[-1]["nll"] < evals[0]["nll"]
    assert evals[-1]["log_odds_ratio"] > evals[0]["log_odds_ratio"]


def test_a_reference_adapter_stays_frozen_under_the_trained_one(pref_config, steerable_lm_dir, tmp_path):
    from .conftest import randomize_adapters

    model, _ = lorakit.load_model(str(steerable_lm_dir))
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.3)
    lorakit.save_adapter(model, tmp_path / "sft")
    sft = _adapter(tmp_path / "sft")
    result = train(pref_config(f"dpo.reference_adapter={tmp_path / 'sft'}", "train.max_steps=4"), progress=False)
    first = next(r for r in _records(result.output_dir) if r["kind"] == "train")
    assert abs(first["loss"] - math.log(2)) <= 1e-7  # the trained adapter starts at zero over the SFT one
    saved = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["rank_pattern"]  # q/v: 2 (reference) + 4 (trained); others 4
    # the saved adapter alone reproduces base + reference + trained adapter
    alone, _ = lorakit.load_model(str(steerable_lm_dir))
    lorakit.load_adapter(alone, result.output_dir)
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    with torch.no_grad():
        torch.testing.assert_close(alone(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-5)
    reference_weights = {k: v for k, v in result.model.state_dict().items() if ".reference." in k}
    assert len(reference_weights) == len(sft)  # and unchanged:
    for key, value in sft.items():
        live = key.replace("base_model.model.", "").replace(".weight", ".reference.weight")
        assert torch.equal(reference_weights[live], value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective=ppo"], r"objective='ppo': use one of \['sft', 'dpo', 'orpo'\]"),
        (["dpo.loss_type=hinge"], r"dpo.loss_type='hinge': use one of \['sigmoid', 'ipo'\]"),
        (["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing=0.1 applies to loss_type=sigmoid"),
        (["dpo.label_smoothing=0.5"], r"dpo.label_smoothing=0.5: use 0 <= value < 0.5"),
        (["dpo.beta=0"], "dpo.beta=0.0: use a positive value"),
        (["data.packing=true"], "objective=dpo scores each answer as one sequence; set data.packing=false"),
        (["task=seq2seq"], "objective=dpo trains causal language models"),
        (["objective=orpo", "dpo.precompute_reference=true"], "need objective=dpo"),
        (["dpo.reference_adapter=x", "train.strategy=fsdp"], "dpo.reference_adapter with train.strategy=fsdp"),
    ],
)
def test_preference_config_errors(pref_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        pref_config(*overrides)


def test_a_reference_adapter_that_cannot_be_summed_is_refused_before_training(pref_config, steerable_lm_dir, tmp_path):
    model, _ = lorakit.load_model(str(steerable_lm_dir))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    lorakit.save_adapter(model, tmp_path / "dora")
    with pytest.raises(ValueError, match=r"dpo.reference_adapter=.*dora: it uses DoRA\. .*use plain LoRA"):
        train(pref_config(f"dpo.reference_adapter={tmp_path / 'dora'}"), progress=False)
    with pytest.raises(ValueError, match=r"dpo.reference_adapter: .*missing is not an adapter directory"):
        train(pref_config(f"dpo.reference_adapter={tmp_path / 'missing'}", out="missing"), progress=False)


# ----- several processes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_adapter_of_one(pref_config, tmp_path, strategy):
    settings = ("train.grad_accum=2", "train.max_steps=4", "train.eval_every=2", "dpo.precompute_reference=true")
    single = train(pref_config(*settings, out="single"), progress=False)
    cfg = pref_config(*settings, f"train.strategy={strategy}", out=strategy).to_dict()
    done = torchrun_train(cfg, tmp_path)
    assert done.stderr.count("trainable params") == 1
    assert _max_diff(_adapter(single.output_dir), _adapter(cfg["output_dir"])) <= 1e-5
    want, got = _records(single.output_dir), _records(cfg["output_dir"])
    assert want[0] == got[0] == {"kind": "run", "step": 0, "precision": "fp32", "reason": "set in the config"}
    want, got = want[1:], got[1:]
    assert [r["kind"] for r in want] == [r["kind"] for r in got]
    for a, b in zip(want, got, strict=True):
        for key in ("loss", "accuracy", "margin"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a, b)
