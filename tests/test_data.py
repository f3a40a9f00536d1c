"""Data loading: every format, completion-only labels, truncation, packing, order, and clear errors."""

import csv
import json

import pytest
import torch

from lorakit.data import (
    IGNORE,
    Example,
    batch_indices,
    collate,
    pack,
    read_rows,
    split_eval,
    tokenize_rows,
)

from .conftest import write_jsonl

ROWS = [
    {"text": "the colour is red"},
    {"prompt": "colour of item 3?", "completion": " blue"},
    {"messages": [{"role": "user", "content": "colour?"}, {"role": "assistant", "content": "green"}]},
]


def test_completion_only_labels_exact_for_prompt_rows(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[1]])
    (example,), stats = tokenize_rows(read_rows(path), tiny_tokenizer, 64, completion_only=True)
    prompt = tiny_tokenizer("colour of item 3?")["input_ids"]
    answer = tiny_tokenizer(" blue", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert example.input_ids == prompt + answer
    assert example.labels == [IGNORE] * len(prompt) + answer
    assert example.prompt_ids == prompt and example.reference == " blue"
    assert stats.trained_tokens == len(answer)


def test_completion_only_labels_exact_for_chat_rows(tiny_tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "colour?"},
        {"role": "assistant", "content": "green"},
        {"role": "user", "content": "again?"},
        {"role": "assistant", "content": "red"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    (example,), _ = tokenize_rows(read_rows(path), tiny_tokenizer, 256, completion_only=True)
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(example.input_ids) == text
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
    assert tiny_tokenizer.decode(trained) == "green<|im_end|>\nred<|im_end|>\n"
    prompt = tiny_tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert tiny_tokenizer.decode(example.prompt_ids) == prompt and example.reference == "red"
    (full,), _ = tokenize_rows(read_rows(path), tiny_tokenizer, 256, completion_only=False)
    assert full.labels == full.input_ids


def test_text_rows_train_on_everything(tiny_tokenizer, tmp_path):
    (example,), _ = tokenize_rows(read_rows(write_jsonl(tmp_path / "d.jsonl", [ROWS[0]])), tiny_tokenizer, 64, True)
    assert example.labels == example.input_ids and example.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert example.reference is None


def test_all_formats_give_the_same_examples(tiny_tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [ROWS[1], {"prompt": "x?", "completion": " y"}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    results = [
        tokenize_rows(read_rows(p), tiny_tokenizer, 64, True)[0]
        for p in (jsonl, tmp_path / "d.csv", tmp_path / "d.parquet", tmp_path / "saved")
    ]
    for other in results[1:]:
        assert [(e.input_ids, e.labels) for e in other] == [(e.input_ids, e.labels) for e in results[0]]


def test_chat_rows_in_csv_are_json_text(tiny_tokenizer, tmp_path):
    with open(tmp_path / "c.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["messages"])
        writer.writeheader()
        writer.writerow({"messages": json.dumps(ROWS[2]["messages"])})
    (example,), stats = tokenize_rows(read_rows(tmp_path / "c.csv"), tiny_tokenizer, 64, True)
    assert stats.kinds == {"chat": 1} and example.reference == "green"


def test_truncation_is_counted(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "red " * 50}, {"text": "blue"}])
    examples, stats = tokenize_rows(read_rows(path), tiny_tokenizer, 16, True)
    assert stats.truncated == 1 and len(examples[0].input_ids) == 16 and len(examples[0].labels) == 16
    assert stats.tokens == 16 + len(examples[1].input_ids)  # the tokens kept, not those cut off
    described = f"train: 2 rows (2 text), {stats.tokens} tokens, {stats.trained_tokens} with loss"
    assert stats.describe("train") == described + "; 1 truncated to max_length"


def test_packing_places_whole_rows_and_labels_no_first_token():
    examples = [Example([1, 2, 3], [IGNORE, 2, 3]), Example([4, 5, 6, 7], [4, 5, 6, 7]), Example([8], [8])]
    packed = pack(examples, 5, "in_order")
    assert [e.input_ids for e in packed] == [[1, 2, 3], [4, 5, 6, 7, 8]]  # a row is never split
    assert [e.labels for e in packed] == [[IGNORE, 2, 3], [IGNORE, 5, 6, 7, IGNORE]]
    assert [e.segments for e in packed] == [[3], [4, 1]]
    batch = collate(packed, 0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["attention_mask"].dtype == torch.bool  # one byte per pair of tokens
    allowed = batch["attention_mask"][1, 0]
    assert allowed.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, True, True, False],
        [False, False, False, False, True],  # the second row sees only itself
    ]
    assert not batch["attention_mask"][0, 0, 3:, :3].any()  # padding sees no row


def test_best_fit_decreasing_fills_sequences_that_in_order_packing_leaves_half_empty():
    lengths = [6, 5, 4, 3, 2]
    examples = [
        Example(list(range(10 * i, 10 * i + n)), list(range(10 * i, 10 * i + n))) for i, n in enumerate(lengths)
    ]
    in_order = pack(examples, 10, "in_order")
    assert [e.segments for e in in_order] == [[6], [5, 4], [3, 2]]
    bfd = pack(examples, 10)
    assert [e.segments for e in bfd] == [[6, 4], [5, 3, 2]]  # 4 goes to the fuller sequence, where it fits
    assert bfd[0].input_ids == examples[0].input_ids + examples[2].input_ids  # rows whole, side by side
    assert bfd[0].labels == [IGNORE, *examples[0].labels[1:], IGNORE, *examples[2].labels[1:]]
    with pytest.raises(ValueError, match="packing strategy 'ffd'"):
        pack(examples, 10, "ffd")


@pytest.mark.parametrize("seed", range(4))
def test_best_fit_decreasing_keeps_every_row_once_and_matches_trl(seed):
    import random as stdrandom

    from datasets import Dataset
    from trl.data_utils import pack_dataset

    rng = stdrandom.Random(seed)
    lengths = [rng.choice([rng.randrange(1, 40), rng.randrange(40, 129)]) for _ in range(rng.randrange(50, 400))]
    examples = [Example([i] * n, [i] * n) for i, n in enumerate(lengths)]
    packed = pack(examples, 128)
    assert all(len(e.input_ids) == sum(e.segments) <= 128 for e in packed)
    placed = sorted(tuple(e.input_ids[k : k + n]) for e in packed for k, n in _offsets(e.segments))
    assert placed == sorted(tuple(e.input_ids) for e in examples)  # every row exactly once, whole
    theirs = pack_dataset(Dataset.from_dict({"input_ids": [e.input_ids for e in examples]}), 128, strategy="bfd")
    assert len(packed) <= len(theirs)  # no more sequences than TRL's best-fit decreasing
    assert len(packed) <= len(pack(examples, 128, "in_order"))
    assert [e.segments for e in pack(examples, 128)] == [e.segments for e in packed]  # deterministic


def _offsets(segments):
    start = 0
    for n in segments:
        yield start, n
        start += n


def test_split_and_order_are_deterministic():
    rows = list(range(100))
    train, held = split_eval(rows, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == rows
    assert split_eval(rows, 0.1, seed=3) == (train, held)
    assert split_eval(rows, 0.1, seed=4)[1] != held
    stream = batch_indices(10, 4, seed=1)
    first = [next(stream)[1] for _ in range(6)]
    resumed = batch_indices(10, 4, seed=1, start=3)
    assert [next(resumed)[1] for _ in range(3)] == first[3:]
    flat = [i for batch in first[:5] for i in batch]  # 20 rows = exactly two epochs
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_collate_pads_right_without_loss():
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "ok"}\n{"text": broken}\n', r"d.jsonl:2: invalid JSON"),
        (b'{"text": "ok"}\n["a list"]\n', r"d.jsonl:2: each line must be a JSON object"),
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r"d.jsonl:2: not valid UTF-8"),
        (
            b'{"txt": "typo"}\n',
            r"d.jsonl:1: a row needs 'text', or 'prompt' and 'completion', or 'messages'; it has txt \(str\)",
        ),
        (b'{"prompt": "p"}\n', r"d.jsonl:1: prompt/completion rows need string fields \['completion'\]"),
        (b'{"text": 5}\n', r"a row needs 'text'.*text \(int\)"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}\n', r"d.jsonl:1: messages\[0\] must be"),
        (b'{"messages": []}\n', r"'messages' must be a non-empty list"),
        (b"\n\n", r"holds no rows"),
    ],
)
def test_malformed_input_names_file_line_and_problem(tiny_tokenizer, tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        tokenize_rows(read_rows(path), tiny_tokenizer, 64, True)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_rows(tmp_path / "none.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown data format '.txt'"):
        read_rows(tmp_path / "d.txt")
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_rows(tmp_path / "d.parquet")


def test_answer_span_marks_reference_through_end_of_turn(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[2], ROWS[1]])
    chat, prompt = tokenize_rows(read_rows(path), tiny_tokenizer, 64, True)[0]
    for example in (chat, prompt):
        answer = example.input_ids[example.answer_start : example.answer_end]
        assert answer[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(answer[:-1]).strip() == example.reference.strip()
    truncated = tokenize_rows(read_rows(path), tiny_tokenizer, chat.answer_end - 1, True)[0][0]
    assert not truncated.scorable


def test_rows_over_the_size_limit_are_refused_without_reading_them_whole(tmp_path, monkeypatch):
    from lorakit.data import readers

    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 1000)
    long_text = "x" * 5000
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "ok"}\n' + json.dumps({"text": long_text}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: the row is longer than .* split the text into several rows"):
        read_rows(jsonl)
    no_newline = tmp_path / "n.jsonl"
    no_newline.write_text("x" * 100_000)  # one endless line: refused after reading MAX_ROW_BYTES + 1 bytes
    with pytest.raises(ValueError, match=r"n.jsonl:1: the row is longer than"):
        read_rows(no_newline)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text"])
        writer.writeheader()
        writer.writerows([{"text": "ok"}, {"text": long_text}])
    with pytest.raises(ValueError, match=r"d.csv:3: the row is longer than"):
        read_rows(tmp_path / "d.csv")
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 10_000)  # under the limit: read as usual, 128 KiB csv default lifted
    assert [row["text"] for _, row in read_rows(tmp_path / "d.csv")] == ["ok", long_text]
