"""Greedy exact match from one teacher-forced pass equals exact match by real greedy generation."""

import torch

import lorakit
from lorakit.data import collate, read_rows, tokenize_rows
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
