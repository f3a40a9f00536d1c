"""Greedy exact match from one teacher-forced pass equals exact match by real greedy generation."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lorakit
from lorakit.data import collate, read_rows, tokenize_rows
from lorakit.train import tasks
from lorakit.train.evaluate import evaluate, generate_batch, token_loss_sum

from .conftest import colour_rows, write_jsonl

STEPS = 30


def test_teacher_forced_exact_match_equals_generation(tiny_lm_dir, tmp_path):
    model, tokenizer = lorakit.load_model(tiny_lm_dir)
    rows = colour_rows(40, seed=5)
    examples, _ = tokenize_rows(read_rows(write_jsonl(tmp_path / "e.jsonl", rows)), tokenizer, 64, True)
    # Train the whole tiny model a little so that some answers are right and some wrong: both get checked.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(STEPS):
        batch = collate(examples[step % 5 * 8 : step % 5 * 8 + 8], tokenizer.pad_token_id)
        loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    result = evaluate(model, tokenizer, examples, batch_size=7, max_new_tokens=6)
    answers = generate_batch(model, tokenizer, [e.prompt_ids for e in examples], max_new_tokens=6)
    by_generation = [a.strip() == e.reference.strip() for a, e in zip(answers, examples, strict=True)]
    assert result.scored == len(examples)
    assert 0 < sum(by_generation) < len(examples), "the check needs both hits and misses"
    assert result.exact_match == sum(by_generation) / len(examples)
    assert len(result.samples) == 3 and result.samples[0][2] == answers[0]


def test_samples_keeps_as_many_rows_as_asked(tiny_lm_dir, tmp_path):
    """``samples`` answers are generated (batch_size rows at a time), as many as there are scorable rows."""
    model, tokenizer = lorakit.load_model(tiny_lm_dir)
    rows = colour_rows(10, seed=2)
    examples, _ = tokenize_rows(read_rows(write_jsonl(tmp_path / "e.jsonl", rows)), tokenizer, 64, True)
    many = evaluate(model, tokenizer, examples, batch_size=4, max_new_tokens=2, samples=8)
    assert [s[1] for s in many.samples] == [e.reference for e in examples[:8]]
    assert len(evaluate(model, tokenizer, examples, batch_size=4, max_new_tokens=2, samples=50).samples) == 10
    assert evaluate(model, tokenizer, examples, max_new_tokens=2, samples=0).samples == []
    assert len(evaluate(model, tokenizer, examples, max_new_tokens=2).samples) == 3  # the trainer's default


# ----- the chunked head (no full logits) and the batch size --------------------------------------------------
VOCAB = 4096  # a large-ish head for a tiny model: the tokenizer uses the first 320 ids, the argmax ranges over all


@pytest.fixture(scope="module")
def trained_wide(tiny_tokenizer, tmp_path_factory):
    """(model, examples): a tiny LLaMA with a 4096-entry head, trained a little on the colour task (some answers
    right, some wrong)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                         tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    path = write_jsonl(tmp_path_factory.mktemp("wide") / "e.jsonl", colour_rows(40, seed=5))
    examples, _ = tokenize_rows(read_rows(path), tiny_tokenizer, 64, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        batch = collate(examples[step % 5 * 8 : step % 5 * 8 + 8], tiny_tokenizer.pad_token_id)
        loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), examples


def _logits_path() -> tasks.CausalLM:
    task = tasks.CausalLM()
    task.fused_loss = False  # the ordinary path: the model's own (batch, tokens, vocabulary) logits
    return task


@pytest.mark.parametrize("chunk", [7, 512])
def test_chunked_head_gives_the_figures_of_the_logits(trained_wide, tiny_tokenizer, monkeypatch, chunk):
    model, examples = trained_wide
    monkeypatch.setattr(tasks, "EVAL_CHUNK", chunk)
    want = evaluate(model, tiny_tokenizer, examples, batch_size=6, samples=0, task=_logits_path())
    got = evaluate(model, tiny_tokenizer, examples, batch_size=6, samples=0)
    assert 0 < want.exact_match < 1 and want.scored == len(examples), "the check needs both hits and misses"
    assert got.exact_match == want.exact_match and got.scored == want.scored
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    # the batch size changes nothing but the padding
    one = evaluate(model, tiny_tokenizer, examples, batch_size=1, samples=0)
    assert one.exact_match == got.exact_match and one.loss == pytest.approx(got.loss, rel=1e-5)


def test_chunked_head_under_bf16_autocast_rounds_as_the_models_head(trained_wide, tiny_tokenizer):
    model, examples = trained_wide
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = evaluate(model, tiny_tokenizer, examples[:12], batch_size=6, generate=False, task=_logits_path())
        got = evaluate(model, tiny_tokenizer, examples[:12], batch_size=6, generate=False)
    assert got.loss == pytest.approx(want.loss, rel=1e-4)


class _VocabTensors(TorchDispatchMode):
    """Records the rows (elements / vocabulary) of every tensor an operation returns whose last dimension is the
    vocabulary, and the (batch, tokens, vocabulary) ones."""

    def __init__(self, batch: int, tokens: int):
        super().__init__()
        self.rows, self.full, self.batch, self.tokens = [], 0, batch, tokens

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == VOCAB:
                self.rows.append(t.numel() // VOCAB)
                self.full += tuple(t.shape) == (self.batch, self.tokens, VOCAB)
        return out


def test_a_plain_causal_lm_never_builds_the_full_logits(trained_wide, tiny_tokenizer, monkeypatch):
    model, examples = trained_wide
    rows = examples[:8]
    tokens = collate(rows, tiny_tokenizer.pad_token_id)["input_ids"].shape[1]
    monkeypatch.setattr(tasks, "EVAL_CHUNK", 7)
    calls = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        with _VocabTensors(8, tokens) as spy:
            evaluate(model, tiny_tokenizer, rows, batch_size=8, samples=0)
        assert calls == [] and spy.full == 0
        # at most one chunk of positions meets the head at a time (the head's weight, transposed, has 32 rows)
        assert spy.rows and max(spy.rows) <= max(7, model.config.hidden_size) < 8 * tokens
        with _VocabTensors(8, tokens) as spy:  # the spy sees full logits where they exist
            evaluate(model, tiny_tokenizer, rows, batch_size=8, samples=0, task=_logits_path())
        assert spy.full >= 1 and calls == [(8, tokens, model.config.hidden_size)]
        calls.clear()
        monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)  # not one linear layer
        evaluate(model, tiny_tokenizer, rows, batch_size=8, samples=0)
        assert len(calls) == 1  # such a model keeps the path through its logits
    finally:
        hook.remove()


def test_eval_batch_size_is_validated_and_defaults_to_a_training_forward(run_config):
    with pytest.raises(ValueError, match=r"train.eval_batch_size=0: use at least 1 row per forward pass"):
        run_config("train.eval_batch_size=0")
    from types import SimpleNamespace

    from lorakit.train.distributed import Context
    from lorakit.train.loop import Loop

    def size(cfg, world):
        return Loop.eval_batch_size.fget(SimpleNamespace(cfg=cfg, ctx=Context(world_size=world)))

    assert size(run_config("train.eval_batch_size=3"), 2) == 3
    assert size(run_config("train.batch_size=8", "train.grad_accum=2"), 2) == 2
    assert size(run_config("train.batch_size=2"), 4) == 1
    with pytest.raises(ValueError, match="batch_size=0: use at least 1"):
        evaluate(None, None, [], batch_size=0)
