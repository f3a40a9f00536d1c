"""The serving engine's parts that make a step lean: the in-place KV cache (``serve.kv``), incremental
detokenization (``serve.text``), and requests joining and leaving a running batch."""

from __future__ import annotations

import queue
import random

import pytest
import torch

import lorakit
from lorakit.serve.kv import SlotKV
from lorakit.serve.text import TextStream

from .conftest import randomize_adapters, save_tiny_lm


def _kv(rows: int, width: int, seed: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 2, width, 4, generator=gen), torch.randn(rows, 2, width, 4, generator=gen))
            for _ in range(layers)]  # fmt: skip


def _left_padded(lengths: list[int], width: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
    return mask


def test_slot_kv_joins_steps_and_closes_up_like_concatenation():
    """A reference kept by concatenation (what a dynamic cache does) against the buffers written in place: the
    same keys, values and mask wherever the mask is 1, through joins shorter and longer than the running rows,
    decode steps, rows leaving, and buffer growth."""
    slots = SlotKV(max_rows=8)
    rows: list[dict] = []  # per running row: its unpadded keys/values per layer, as lists of columns

    def join(lengths, width, seed):
        kv, mask = _kv(len(lengths), width, seed), _left_padded(lengths, width)
        slots.add(kv, mask)
        for i, n in enumerate(lengths):
            rows.append({"k": [k[i, :, width - n :] for k, _ in kv], "v": [v[i, :, width - n :] for _, v in kv]})

    def step(seed):
        cache = slots.step_cache()
        new = _kv(slots.rows, 1, seed)
        for layer, (k, v) in enumerate(new):
            got_k, got_v = cache.update(k, v, layer)
            assert got_k.shape[2] == got_v.shape[2] == slots.length + 1 == slots.attention_mask(extra=1).shape[1]
        slots.advance()
        for i, row in enumerate(rows):
            row["k"] = [torch.cat([old, k[i]], dim=1) for old, (k, _) in zip(row["k"], new, strict=True)]
            row["v"] = [torch.cat([old, v[i]], dim=1) for old, (_, v) in zip(row["v"], new, strict=True)]

    def check():
        mask = slots.attention_mask()
        assert mask.shape[0] == len(rows) and mask.shape[1] >= max(r["k"][0].shape[1] for r in rows)
        for i, row in enumerate(rows):
            n = row["k"][0].shape[1]
            assert mask[i, -n:].all() and not mask[i, :-n].any()
            for layer in range(2):
                assert torch.equal(slots.keys[layer][i, :, slots.hi - n : slots.hi], row["k"][layer])
                assert torch.equal(slots.values[layer][i, :, slots.hi - n : slots.hi], row["v"][layer])
                assert torch.isfinite(slots.keys[layer]).all() and torch.isfinite(slots.values[layer]).all()

    join([3, 5], 8, 0)
    check()
    for s in range(3):
        step(10 + s)
    check()
    join([2], 8, 1)  # shorter than the running rows (8 columns): written to the right
    check()
    join([12, 4], 16, 2)  # longer: takes columns left of the running ones
    check()
    before = slots.reallocations
    for s in range(70):  # past the first column capacity: grows (doubling), not once per step
        step(100 + s)
    check()
    assert slots.reallocations - before <= 2
    for drop in ([1, 3], [0]):  # rows leave from the middle and the front; the others move up in order
        keep = [i for i in range(len(rows)) if i not in drop]
        rows[:] = [rows[i] for i in keep]
        slots.keep(keep)
        check()
    assert slots.length == max(r["k"][0].shape[1] for r in rows)  # leading all-padding columns dropped
    step(999)
    check()
    slots.keep([])
    rows.clear()
    assert slots.rows == 0
    join([4], 8, 3)  # a new batch reuses the buffers
    check()


def _spm_like_tokenizer():
    """A SentencePiece-style BPE (Metaspace: a leading space marker that decoding strips at the start), whose
    text for a token depends on what comes before it."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = SentencePieceBPETokenizer()
    corpus = [f"the colour of item {i} is {c}, très jolie ça" for i in range(60) for c in ("red", "blue", "vert")]
    tok.train_from_iterator(corpus, vocab_size=200, special_tokens=["<unk>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_incremental_text_equals_the_whole_decode_token_by_token(tiny_tokenizer, kind):
    tokenizer = tiny_tokenizer if kind == "byte-level" else _spm_like_tokenizer()
    rng = random.Random(0)
    streams = [tokenizer("the colour of item 12 is très vert, ça")["input_ids"]]
    streams += [[rng.randrange(len(tokenizer)) for _ in range(30)] for _ in range(60)]  # split characters too
    for ids in streams:
        text = TextStream()
        for end in range(1, len(ids) + 1):
            assert text.add(tokenizer, ids[:end]) == tokenizer.decode(ids[:end], skip_special_tokens=True)


def test_incremental_text_decodes_a_window_not_the_whole_output(tiny_tokenizer):
    lengths = []

    class Counting:
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return tiny_tokenizer.decode(ids, **kwargs)

    ids = tiny_tokenizer(" ".join(["the colour of item 3 is red"] * 20))["input_ids"]
    text = TextStream()
    for end in range(1, len(ids) + 1):
        text.add(Counting(), ids[:end])
    assert len(ids) > 100 and max(lengths) <= 4


@pytest.fixture(scope="module")
def engine_lm(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("engine")
    model_dir = save_tiny_lm(root / "lm", tiny_tokenizer, initializer_range=0.2, max_position_embeddings=512)
    model, _ = lorakit.load_model(model_dir)
    for i, name in enumerate(("a", "b")):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"), name)
        randomize_adapters(model, seed=i, scale=0.3)
        lorakit.save_adapter(model, root / name, name)
    return model_dir, {n: root / n for n in ("a", "b")}


def test_requests_joining_and_leaving_a_running_batch_get_each_models_greedy_tokens(engine_lm, tiny_tokenizer):
    """Requests of different prompt lengths, lengths to generate and adapters join while others run (each
    submitted when an earlier one has produced some tokens) and leave at different steps; each gets exactly the
    greedy tokens of its model alone (float32), so no join, close-up or column drop moved a key or value."""
    from lorakit.serve.engine import Engine, Request, SamplingParams

    model_dir, adapters = engine_lm
    model, tokenizer = lorakit.load_model(model_dir)
    for name, directory in adapters.items():
        lorakit.load_adapter(model, directory, name)
    engine = Engine(model, tokenizer, max_batch_size=8)
    plan = [  # (prompt, adapter, tokens to generate, submitted after request k has produced n tokens)
        ("the colour of item 3 is", "a", 12, None),
        ("item", None, 30, (0, 2)),
        ("the colour of item 45 is green and the colour of item 7 is", "b", 6, (0, 4)),  # longer than the rest
        ("the", "a", 20, (1, 3)),
        ("the colour of item 12", "b", 9, (2, 5)),
        ("blue", None, 15, (3, 10)),
    ]
    done: queue.Queue = queue.Queue()
    requests: list[Request] = []
    submitted = {0}

    def sink(k):
        def on_event(event):  # on the engine thread, after a token of request k (not every token sends text)
            assert event.error is None, event.error
            for j, (_, _, _, after) in enumerate(plan):
                if after and after[0] == k and requests[k].sampled >= after[1] and j not in submitted:
                    submitted.add(j)
                    engine.submit(requests[j])
            if event.finish_reason:
                done.put(k)

        return on_event

    for k, (prompt, adapter, tokens, _) in enumerate(plan):
        ids = tokenizer(prompt)["input_ids"]
        requests.append(Request(ids, adapter, SamplingParams(max_tokens=tokens, ignore_eos=True), sink(k)))
    engine.submit(requests[0])
    engine.start()
    try:
        finished = {done.get(timeout=60) for _ in plan}
    finally:
        engine.stop()
    assert finished == set(range(len(plan)))
    assert engine._kv.reallocations <= 4
    for adapter in (None, "a", "b"):
        alone, _ = lorakit.load_model(model_dir)
        if adapter:
            lorakit.load_adapter(alone, adapters[adapter], adapter)
        for req in (r for r in requests if r.adapter == adapter):
            n = req.params.max_tokens
            expected = alone.generate(torch.tensor([req.prompt_ids]), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)  # fmt: skip
            assert req.generated == expected[0, len(req.prompt_ids) :].tolist(), (adapter, req.prompt_ids)


def test_run_here_decodes_on_the_calling_thread_like_the_engine_thread(engine_lm, tiny_tokenizer):
    """``run_here`` (what ``lorakit serve`` does on its main thread) gives the tokens ``start``'s own thread gives,
    on the calling thread, and returns once ``until()`` is true."""
    import threading

    from lorakit.serve.engine import Engine, Request, SamplingParams

    model_dir, adapters = engine_lm
    model, tokenizer = lorakit.load_model(model_dir)
    lorakit.load_adapter(model, adapters["a"], "a")
    prompts = [tokenizer(p)["input_ids"] for p in ("the colour of item 3 is", "item")]
    results = {}
    for mode in ("thread", "here"):
        engine = Engine(model, tokenizer, max_batch_size=4)
        threads, done = set(), queue.Queue()

        def sink(event, threads=threads, done=done):
            threads.add(threading.current_thread())
            if event.finish_reason:
                done.put(event)

        requests = [Request(ids, name, SamplingParams(max_tokens=5, ignore_eos=True), sink)
                    for ids in prompts for name in (None, "a")]  # fmt: skip
        for request in requests:
            engine.submit(request)
        if mode == "thread":
            engine.start()
            for _ in requests:
                done.get(timeout=60)
            engine.stop()
            assert threads == {engine._thread}
        else:
            engine.reserve_caller_thread()
            engine.start()  # as the app's lifespan does: the loop is reserved for this thread, nothing starts
            assert not engine._thread.is_alive()
            count = len(requests)
            engine.run_here(until=lambda done=done, count=count: done.qsize() == count)
            engine.stop()
            assert threads == {threading.current_thread()}
        results[mode] = [r.generated for r in requests]
    assert results["here"] == results["thread"] and all(len(g) == 5 for g in results["here"])


def test_a_burst_reaching_an_idle_engine_is_admitted_together(engine_lm, tiny_tokenizer, monkeypatch):
    """An idle engine waits while requests keep arriving (BURST_QUIET_S apart at most) and admits them together,
    for one prefill; it stops waiting at BURST_MAX_S or a full batch, and never waits while rows are running."""
    import threading
    import time

    from lorakit.serve import engine as engine_module
    from lorakit.serve.engine import Engine, Request, SamplingParams

    model_dir, _ = engine_lm
    model, tokenizer = lorakit.load_model(model_dir)

    def request():
        return Request([5, 6, 7], None, SamplingParams(max_tokens=2), lambda event: None)

    monkeypatch.setattr(engine_module, "BURST_QUIET_S", 2.0)  # generous: the test's own arrivals are 0.05 s apart
    monkeypatch.setattr(engine_module, "BURST_MAX_S", 30.0)
    engine = Engine(model, tokenizer, max_batch_size=8)
    first, admitted = request(), []
    engine.submit(first)
    admitting = threading.Thread(target=lambda: admitted.extend(engine._admit()))
    admitting.start()
    later = [request() for _ in range(3)]
    for req in later:
        time.sleep(0.05)
        engine.submit(req)
    admitting.join(timeout=60)
    assert admitted == [first, *later]

    engine = Engine(model, tokenizer, max_batch_size=2)  # a full batch ends the wait at once
    engine.submit(request())
    engine.submit(request())
    start = time.monotonic()
    assert len(engine._admit()) == 2 and time.monotonic() - start < 1.0

    monkeypatch.setattr(engine_module, "BURST_MAX_S", 0.05)  # the cap
    engine = Engine(model, tokenizer)
    engine.submit(request())
    start = time.monotonic()
    assert len(engine._admit()) == 1 and time.monotonic() - start < 1.5

    monkeypatch.setattr(engine_module, "BURST_MAX_S", 30.0)  # rows running: no wait
    engine._running = [request()]
    engine.submit(request())
    start = time.monotonic()
    assert len(engine._admit()) == 1 and time.monotonic() - start < 1.5
