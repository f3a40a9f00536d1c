"""`lorakit serve` as a real process on 127.0.0.1, called with the official openai client.

A tiny LLaMA with three adapters (a, b, c) loaded at start and a fourth (d) in --adapter-dir for run-time
loading. Greedy outputs are compared with offline `lorakit generate`, concurrent mixed-adapter requests
with the same requests sent one at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.cli.main import main

from .conftest import decode_in_one_batch, free_port, randomize_adapters, save_tiny_lm

ADAPTERS = ("a", "b", "c")
PROMPTS = ("the colour of item 3 is", "the colour", "item 12 is", "the colour of item 45 is green and")
KEY = "sekret-key"
# The servers of the tests comparing greedy text with offline generate run fp32: in bf16 a routed mixed batch and a
# lone adapter round differently (by ~1 bf16 step of a logit), so near ties may go either way; see
# test_the_engine_under_a_precision_decodes_a_mixed_batch_like_each_adapted_model for bf16-mixed and bf16.
SERVE_FP32 = ["--precision", "fp32"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer):
    """Model dir, adapter dirs, and a running server with a, b, c loaded and d available by name."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_lm(root / "lm", tiny_tokenizer, initializer_range=0.2, max_position_embeddings=4096)
    model, _ = lorakit.load_model(model_dir)
    adapter_dir = root / "adapters"
    for i, name in enumerate((*ADAPTERS, "d")):
        targets = "all-linear" if i % 2 == 0 else ["q_proj", "v_proj", "down_proj"]
        lorakit.inject(model, lorakit.LoraConfig(r=2 + 2 * i, alpha=8, target_modules=targets, init="random"), name)
        randomize_adapters(model, seed=i, scale=0.3)
        lorakit.save_adapter(model, adapter_dir / name, name)
    outside = root / "outside"
    lorakit.save_adapter(model, outside / "x", "d")
    (adapter_dir / "escape").symlink_to(outside / "x")
    port = free_port()
    args = ["--model", str(model_dir), "--adapter-dir", str(adapter_dir), "--port", str(port), "--max-tokens", "3000"]
    args += SERVE_FP32
    for name in ADAPTERS:
        args += ["--adapter", f"{name}={adapter_dir / name}"]
    proc = _start(args, port)
    yield {"model": model_dir, "adapters": adapter_dir, "port": port, "root": root, "base": "lm"}
    _stop(proc)


@pytest.fixture(scope="module")
def limited(served, tiny_tokenizer):
    """A second server: API key, batch of 1, queue of 1, 2-second timeout. Its model is wider and deeper than the
    tiny one (a few ms a token, not a fraction of one), so a request of 3900 tokens outlasts the timeout."""
    model = save_tiny_lm(served["root"] / "slower-lm", tiny_tokenizer, hidden_size=512, num_hidden_layers=6,
                         intermediate_size=1536, num_attention_heads=8, max_position_embeddings=4096)  # fmt: skip
    port = free_port()
    args = ["--model", str(model), "--served-model-name", "lm", "--port", str(port), "--api-key", KEY]
    args += ["--max-batch-size", "1"]
    args += ["--max-queue", "1", "--timeout", "2", "--max-tokens", "4000", "--max-body-bytes", "4096", *SERVE_FP32]
    proc = _start(args, port, key=KEY)
    yield {**served, "model": model, "port": port}
    _stop(proc)


def _start(args: list[str], port: int, key: str | None = None, ignore_sigint: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        preexec_fn=ignore,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + proc.stdout.read().decode())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server did not come up in 120 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def client(port: int, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60, **kw)


def raw(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one HTTP request, errors included."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers or {})
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def offline(served, capsys, adapter: str | None, *, prompt: str | None = None, chat: str | None = None, n=12) -> str:
    # the servers here run fp32 (SERVE_FP32), and so does generate: exactly the same greedy tokens
    args = ["generate", "--model", str(served["model"]), "--max-new-tokens", str(n), "--precision", "fp32"]
    args += ["--adapter", str(served["adapters"] / adapter)] if adapter else []
    args += ["--prompt", prompt] if prompt is not None else ["--chat", chat]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


def complete(port: int, model: str, prompt: str, **kw) -> str:
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    if kw.pop("ignore_eos", False):
        kw["extra_body"] = {"ignore_eos": True}
    return client(port).completions.create(model=model, prompt=prompt, **kw).choices[0].text


# ----- the main server -------------------------------------------------------------------------------------------
def test_models_lists_base_and_adapters(served):
    ids = [m.id for m in client(served["port"]).models.list().data]
    assert ids == ["lm", "a", "b", "c"]


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_greedy_completion_and_chat_equal_offline_generate(served, capsys, adapter):
    model = adapter or served["base"]
    prompt = PROMPTS[0]
    assert complete(served["port"], model, prompt) == offline(served, capsys, adapter, prompt=prompt)
    chat = client(served["port"]).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "colour of item 7?"}], max_tokens=12, temperature=0
    )
    assert chat.choices[0].message.content == offline(served, capsys, adapter, chat="colour of item 7?")
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 12 or chat.choices[0].finish_reason == "stop"


def test_adapters_change_the_output(served):
    outputs = {m: complete(served["port"], m, PROMPTS[0]) for m in ["lm", *ADAPTERS]}
    assert len(set(outputs.values())) == 4, outputs


def test_streaming_gives_the_same_text_in_openai_chunks(served):
    c = client(served["port"])
    full = complete(served["port"], "b", PROMPTS[1], max_tokens=20)
    stream = c.completions.create(model="b", prompt=PROMPTS[1], max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(ch.object == "text_completion" for ch in chunks)
    chat_kw = {"model": "c", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 15, "temperature": 0}
    whole = c.chat.completions.create(**chat_kw).choices[0].message.content
    parts = list(c.chat.completions.create(**chat_kw, stream=True, stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole
    assert parts[-1].usage.completion_tokens >= 1 and parts[-1].choices == []


def test_concurrent_mixed_adapters_equal_one_at_a_time(served):
    port = served["port"]
    jobs = [(m, p) for p in PROMPTS for m in ["lm", *ADAPTERS]]
    one_by_one = [complete(port, m, p, max_tokens=24) for m, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(port, *job, max_tokens=24), jobs))
    assert together == one_by_one


def test_sampling_with_seed_is_reproducible_under_concurrency(served):
    port = served["port"]
    kw = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 16}
    alone = complete(port, "a", PROMPTS[2], **kw)
    with ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(complete, port, m, PROMPTS[0], max_tokens=30) for m in ADAPTERS]
        again = pool.submit(complete, port, "a", PROMPTS[2], **kw).result()
        [f.result() for f in noise]
    assert again == alone
    others = {complete(port, "a", PROMPTS[2], **{**kw, "seed": s}) for s in range(8)}
    assert len(others) > 1  # the seed matters: sampling is not greedy in disguise


def test_stop_strings_cut_the_text(served):
    port = served["port"]
    full = complete(port, "a", PROMPTS[0], max_tokens=20)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    cut = client(port).completions.create(model="a", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client(port).completions.create(
        model="a", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == full[: full.index(stop)]


def test_several_prompts_and_n_choices(served):
    port = served["port"]
    resp = client(port).completions.create(model="c", prompt=list(PROMPTS[:2]), max_tokens=8, temperature=0)
    assert [ch.text for ch in resp.choices] == [complete(port, "c", p, max_tokens=8) for p in PROMPTS[:2]]
    assert [ch.index for ch in resp.choices] == [0, 1]
    sampled = client(port).completions.create(model="c", prompt=PROMPTS[0], max_tokens=8, n=3, seed=1)
    assert len(sampled.choices) == 3


def test_load_and_unload_adapters_at_run_time(served, capsys):
    port = served["port"]
    status, body = raw(port, "POST", "/v1/adapters", json.dumps({"name": "d"}).encode())
    assert status == 200 and body["id"] == "d"
    assert "d" in [m.id for m in client(port).models.list().data]
    assert complete(port, "d", PROMPTS[0]) == offline(served, capsys, "d", prompt=PROMPTS[0])
    status, _ = raw(port, "POST", "/v1/adapters", json.dumps({"name": "d2", "path": "d"}).encode())
    assert status == 200 and complete(port, "d2", PROMPTS[0]) == complete(port, "d", PROMPTS[0])
    status, body = raw(port, "POST", "/v1/adapters", json.dumps({"name": "d"}).encode())
    assert status == 409 and "already loaded" in body["error"]["message"]
    for name in ("d", "d2"):
        status, body = raw(port, "DELETE", f"/v1/adapters/{name}")
        assert status == 200 and body["deleted"] is True
    assert "d" not in [m.id for m in client(port).models.list().data]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(port, "d", PROMPTS[0])
    status, body = raw(port, "DELETE", "/v1/adapters/d")
    assert status == 404
    # the adapters that stayed are untouched
    assert complete(port, "a", PROMPTS[0]) == offline(served, capsys, "a", prompt=PROMPTS[0])


def test_unloading_waits_for_requests_using_the_adapter(served):
    """The DELETE comes once the request is surely in flight (its first token streamed), not after a guessed
    delay: the request still runs to its end on the adapter, and the DELETE returns only about then."""
    port = served["port"]
    assert raw(port, "POST", "/v1/adapters", json.dumps({"name": "busy", "path": "d"}).encode())[0] == 200
    started = threading.Event()

    def long_request() -> tuple[int, str | None, float]:
        stream = client(port).completions.create(
            model="busy", prompt=PROMPTS[0], max_tokens=600, temperature=0, stream=True,
            extra_body={"ignore_eos": True}, stream_options={"include_usage": True},
        )  # fmt: skip
        tokens, reason = 0, None
        for chunk in stream:
            started.set()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
        return tokens, reason, time.perf_counter()

    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(long_request)
        assert started.wait(60)
        status, _ = raw(port, "DELETE", "/v1/adapters/busy")
        deleted_at = time.perf_counter()
        assert status == 200
        tokens, reason, ended_at = long.result(timeout=60)
    assert (tokens, reason) == (600, "length")  # served to the end on the adapter
    assert deleted_at >= ended_at - 1.0  # the delete returned only once the request was (nearly) done


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"name": "p1", "path": "/etc"}, 400, "absolute adapter paths are refused"),
        ({"name": "p2", "path": "../outside/x"}, 400, "'..' is refused"),
        ({"name": "p3", "path": "escape"}, 400, "leads outside the adapter directory"),
        ({"name": "p4", "path": "missing"}, 404, "no adapter at"),
        ({"name": "../x"}, 400, "invalid adapter name"),
        ({"name": "lm"}, 400, "base model's name"),
        ({"name": "a"}, 409, "already loaded"),
        ({"name": 5}, 400, "name"),
        ({"name": "p5", "extra": 1}, 400, "extra"),
    ],
)
def test_adapter_loading_refuses_paths_outside_the_directory(served, body, status, words):
    got, answer = raw(served["port"], "POST", "/v1/adapters", json.dumps(body).encode())
    assert got == status, answer
    assert words in answer["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/completions", b'{"model": "a", "prompt": ', 400, "not valid JSON"),
        ("/v1/completions", b'{"model": "a", "prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "a", "prompt": "x", "temperature": "hot"}', 400, "temperature"),
        ("/v1/completions", b'{"model": "a", "prompt": 17}', 400, "prompt"),
        ("/v1/completions", b'{"model": "a"}', 400, "prompt"),
        ("/v1/completions", b'{"model": "nope", "prompt": "x"}', 404, "does not exist"),
        ("/v1/completions", b'{"model": "a", "prompt": "x", "max_tokens": 100000}', 400, "exceeds this server's limit"),
        ("/v1/completions", b'{"model": "a", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "a", "prompt": ""}', 400, "prompt is empty"),
        ("/v1/completions", b'{"model": "a", "prompt": []}', 400, "prompt is empty"),
        ("/v1/completions", b'{"model": "a", "prompt": [99999]}', 400, "outside the vocabulary"),
        ("/v1/completions", b'{"model": "a", "prompt": "x", "top_p": 0}', 400, "top_p"),
        ("/v1/completions", b'{"model": "a", "prompt": "x", "logprobs": 2}', 400, "logprobs"),
        ("/v1/completions", b"[1, 2]", 400, "invalid request"),
        ("/v1/chat/completions", b'{"model": "a", "messages": []}', 400, "messages"),
        ("/v1/chat/completions", b'{"model": "a", "messages": [{"role": "user", "content": ""}]}', 400, "empty"),
        ("/v1/chat/completions", b'{"model": "a", "messages": [{"role": "robot", "content": "x"}]}', 400, "role"),
        ("/v1/chat/completions", b'{"model": "a", "messages": "hi"}', 400, "messages"),
        ("/v1/nothing", b"{}", 404, "no such endpoint"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, path, body, status, words):
    got, answer = raw(served["port"], "POST", path, body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert words in answer["error"]["message"]
    assert complete(served["port"], "a", PROMPTS[1], max_tokens=2)


def test_openai_client_sees_typed_errors(served):
    c = client(served["port"])
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="exceeds this server's limit"):
        c.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], max_tokens=10**6)


def test_health_and_prometheus_metrics(served):
    status, body = raw(served["port"], "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    complete(served["port"], "a", PROMPTS[0], max_tokens=3)
    status, text = raw(served["port"], "GET", "/metrics")
    assert status == 200
    for name in (
        'lorakit_requests_total{endpoint="/v1/completions",status="200"}',
        "lorakit_completion_tokens_total",
        "lorakit_prompt_tokens_total",
        "lorakit_request_latency_seconds_bucket",
        "lorakit_queue_depth",
        "lorakit_running_requests",
    ):
        assert name in text
    tokens = next(line for line in text.splitlines() if line.startswith("lorakit_completion_tokens_total"))
    assert float(tokens.split()[-1]) >= 3


# ----- limits: API key, queue, timeout, disconnects ----------------------------------------------------------
def test_api_key_is_required_when_set(limited):
    port = limited["port"]
    with pytest.raises(openai.AuthenticationError):
        client(port, key="wrong").models.list()
    assert raw(port, "GET", "/v1/models")[0] == 401
    assert raw(port, "GET", "/metrics")[0] == 401
    assert raw(port, "GET", "/health")[0] == 200
    assert [m.id for m in client(port, key=KEY).models.list().data] == ["lm"]


def _wait_for(port: int, field: str, value: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if raw(port, "GET", "/health")[1][field] == value:
            return
        time.sleep(0.02)
    raise AssertionError(f"/health never showed {field}={value}")


def test_queue_full_gives_429_and_timeouts_408(limited):
    port = limited["port"]
    c = client(port, key=KEY)
    first = c.completions.create(model="lm", prompt="x", max_tokens=3900, stream=True, extra_body={"ignore_eos": True})
    next(iter(first))  # running: the batch (size 1) is full
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(lambda: c.completions.create(model="lm", prompt="x", max_tokens=2))
        _wait_for(port, "waiting", 1)
        with pytest.raises(openai.RateLimitError, match="busy"):
            c.completions.create(model="lm", prompt="x", max_tokens=2)
        first.close()
        assert queued.result().choices[0].text is not None
    with pytest.raises(openai.APIStatusError, match="timed out") as err:
        c.completions.create(model="lm", prompt="x", max_tokens=3900, extra_body={"ignore_eos": True})
    assert err.value.status_code == 408


def test_a_burst_beyond_the_queue_gets_429_and_no_server_errors(limited):
    port = limited["port"]  # batch 1, queue 1: of 24 simultaneous requests at most 2 are admitted at once

    def one(_):
        try:
            client(port, key=KEY).completions.create(model="lm", prompt="x", max_tokens=40)
            return 200
        except openai.APIStatusError as err:
            return err.status_code

    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(one, range(24)))
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 1 and codes.count(429) >= 12, codes
    assert one(0) == 200  # and the server serves normally afterwards


def test_client_disconnect_stops_its_work(limited):
    port = limited["port"]
    c = client(port, key=KEY)
    stream = c.completions.create(model="lm", prompt="x", max_tokens=3900, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    _wait_for(port, "running", 1)
    stream.close()
    started = time.monotonic()
    _wait_for(port, "running", 0, timeout=5)
    assert time.monotonic() - started < 1.9  # well before the 2 s timeout would have ended it


def test_oversized_body_is_refused(limited):
    status, body = raw(limited["port"], "POST", "/v1/completions", b'{"prompt": "' + b"x" * 5000 + b'"}')
    assert status == 413 and "exceeds the limit" in body["error"]["message"]


# ----- merge export --------------------------------------------------------------------------------------------
def test_merged_export_generates_like_the_adapter_in_plain_transformers(served, capsys, tmp_path):
    out = tmp_path / "merged"
    args = ["merge", "--model", str(served["model"]), "--adapter", str(served["adapters"] / "b"), "--out", str(out)]
    assert main(args) == 0
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    merged = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        new = merged.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(new[0, ids.shape[1] :], skip_special_tokens=True) == offline(
        served, capsys, "b", prompt=PROMPTS[0]
    )


def test_serve_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path), "--adapter", "oops"]) == 2
    assert "write NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be >= 1" in capsys.readouterr().err


# ----- a model whose layers see the rows flattened ---------------------------------------------------------------
@pytest.fixture(scope="module")
def served_opt(tmp_path_factory, tiny_tokenizer):
    """A tiny OPT (its decoder runs the MLP on (rows * tokens, hidden)) with adapters a, b, c."""
    root = tmp_path_factory.mktemp("serve-opt")
    save_tiny_lm(root / "opt", tiny_tokenizer, family="opt", init_std=0.2, max_position_embeddings=512)
    model, _ = lorakit.load_model(root / "opt")
    args = ["--model", str(root / "opt"), "--port", str(free_port()), *SERVE_FP32]
    for i, name in enumerate(ADAPTERS):
        config = lorakit.LoraConfig(r=2 + i, alpha=8, target_modules=["q_proj", "v_proj", "fc1", "fc2"], init="random")
        lorakit.inject(model, config, name)
        randomize_adapters(model, seed=i, scale=0.3)
        lorakit.save_adapter(model, root / "adapters" / name, name)
        args += ["--adapter", f"{name}={root / 'adapters' / name}"]
    proc = _start(args, int(args[3]))
    yield {"model": root / "opt", "adapters": root / "adapters", "port": int(args[3]), "base": "opt"}
    _stop(proc)


def test_mixed_adapters_on_a_model_that_flattens_rows(served_opt, capsys):
    port = served_opt["port"]
    jobs = [(m, p) for p in PROMPTS[:3] for m in ["opt", *ADAPTERS]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(port, *job, max_tokens=10), jobs))
    alone = [complete(port, m, p, max_tokens=10) for m, p in jobs]
    assert together == alone
    offline_texts = {
        m: offline(served_opt, capsys, None if m == "opt" else m, prompt=PROMPTS[0], n=10) for m in ["opt", *ADAPTERS]
    }
    assert [together[k] for k, (m, p) in enumerate(jobs) if p == PROMPTS[0]] == list(offline_texts.values())
    assert len(set(offline_texts.values())) == 4, offline_texts  # the adapters really differ


def test_a_failed_prefill_answers_its_requests_and_the_engine_keeps_serving(tiny_lm_dir):
    import queue

    from lorakit.serve.engine import Engine, Request, SamplingParams

    model, tokenizer = lorakit.load_model(tiny_lm_dir)
    failures = [RuntimeError("boom")]

    def fail_once(module, args, kwargs):
        if failures:
            raise failures.pop()

    model.register_forward_pre_hook(fail_once, with_kwargs=True)
    engine = Engine(model, tokenizer).start()
    try:
        events: queue.Queue = queue.Queue()
        for k in range(2):
            engine.submit(Request([5, 6, 7 + k], None, SamplingParams(max_tokens=3), lambda e, k=k: events.put((k, e))))
        errors = {}
        while len(errors) < 2:  # both requests of the failed first prefill get an error, none is left hanging
            k, event = events.get(timeout=30)
            if event.error:
                errors[k] = event.error
        assert all("generation failed: RuntimeError: boom" in e for e in errors.values())
        done = queue.Queue()
        engine.submit(Request([5, 6, 7], None, SamplingParams(max_tokens=3), done.put))
        while (event := done.get(timeout=30)).finish_reason is None:
            assert event.error is None
        assert event.completion_tokens == 3 or event.finish_reason == "stop"
    finally:
        engine.stop()


def test_the_engine_pads_prefills_to_a_few_shapes_and_trims_the_heap(tiny_lm_dir, monkeypatch):
    """Prefills are left-padded to a multiple of PREFILL_LENGTH_STEP tokens (one GEMM kernel per shape, not per
    prompt length) without changing the tokens, and the engine hands freed heap pages back while it serves."""
    import queue

    from lorakit.serve import engine as engine_module
    from lorakit.serve.engine import Engine, Request, SamplingParams

    trims = []
    monkeypatch.setattr(engine_module, "TRIM_EVERY_S", 0.0)
    monkeypatch.setattr(engine_module, "trim_freed_memory", lambda: trims.append(1) or True)
    model, tokenizer = lorakit.load_model(tiny_lm_dir)
    widths = []
    model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]  # 9 tokens: padded to 16
    engine = Engine(model, tokenizer).start()
    try:
        done: queue.Queue = queue.Queue()
        engine.submit(Request(prompt, None, SamplingParams(max_tokens=4, ignore_eos=True), done.put))
        texts = []
        while (event := done.get(timeout=30)).finish_reason is None:
            assert event.error is None
            texts.append(event.text)
        texts.append(event.text)
    finally:
        engine.stop()
    # the prefill is the model's one forward; the three decode steps are the engine's own (serve.step)
    assert widths == [2 * engine_module.PREFILL_LENGTH_STEP] and engine.steps == 4
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert event.completion_tokens == 4
    assert "".join(texts) == tokenizer.decode(expected[0, len(prompt) :])  # the padding changed no token
    assert trims  # at least once per step here (TRIM_EVERY_S = 0)


# ----- mixed precision (issue 28) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def precision_lm(tmp_path_factory, tiny_tokenizer):
    """A tiny LLaMA (float32 on disk) and three float32 adapters a, b, c of different ranks and targets."""
    root = tmp_path_factory.mktemp("serve-precision")
    model_dir = save_tiny_lm(root / "lm", tiny_tokenizer, initializer_range=0.2)
    model, _ = lorakit.load_model(model_dir)
    for i, name in enumerate(ADAPTERS):
        targets = "all-linear" if i % 2 == 0 else ["q_proj", "v_proj", "down_proj"]
        lorakit.inject(model, lorakit.LoraConfig(r=2 + 2 * i, alpha=8, target_modules=targets, init="random"), name)
        randomize_adapters(model, seed=i, scale=0.3)
        lorakit.save_adapter(model, root / name, name)
    return {"model": model_dir, "adapters": {n: root / n for n in ADAPTERS}}


def _near_greedy_steps(model, precision, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """For each of ``tokens`` generated after ``prompt_ids``: how far below the best logit of ``model`` (itself, its
    active adapter, fed the same tokens) that token's logit is, relative to the largest logit. 0 everywhere: the
    model's own greedy tokens."""
    ids = torch.tensor([prompt_ids + tokens])
    with torch.no_grad(), precision.context("cpu"):
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    picked = logits.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    return ((logits.amax(1) - picked) / logits.abs().amax(1)).tolist()


@pytest.mark.parametrize("name", ["bf16-mixed", "bf16"])
def test_the_engine_under_a_precision_decodes_a_mixed_batch_like_each_adapted_model(precision_lm, name):
    """bf16-mixed: a bf16 base, float32 adapters, every forward under bf16 autocast; bf16: all bf16. A batch
    mixing the base and three adapters (routed, one forward per step) gives each request the greedy tokens of
    the model with that adapter alone, in the same precision: each token is that model's argmax given the tokens
    before it, up to bf16 rounding (the routed batch and the lone adapter round differently, by ~1 bf16 step of a
    logit: where two logits are that close, either is the greedy token)."""
    from lorakit.precision import decide
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import AdapterRegistry

    precision = decide(name, "cpu")
    model, tokenizer = lorakit.load_model(precision_lm["model"], dtype=precision.storage)
    engine = Engine(model, tokenizer, max_batch_size=8, precision=precision)
    registry = AdapterRegistry(model, engine, "lm", adapter_dtype=precision.trained)
    for adapter, directory in precision_lm["adapters"].items():
        registry.load_at_start(adapter, directory)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {precision.storage}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {precision.trained}
    prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS[:2]]
    requests = decode_in_one_batch(engine, prompts, [None, *ADAPTERS], tokens=8)
    assert engine.steps == 8  # one prefill and seven decode steps served every request together
    gaps = []
    for adapter in (None, *ADAPTERS):
        direct, _ = lorakit.load_model(precision_lm["model"], dtype=precision.storage)
        if adapter is not None:
            lorakit.load_adapter(direct, precision_lm["adapters"][adapter], adapter, adapter_dtype=precision.trained)
        for request in (r for r in requests if r.adapter == adapter):
            assert len(request.generated) == 8
            gaps += _near_greedy_steps(direct, precision, request.prompt_ids, request.generated)
    assert max(gaps) < 2**-5, gaps  # a near tie at most: a few bf16 steps (2^-8 to 2^-7) of the largest logit
    assert sum(g == 0 for g in gaps) >= 0.9 * len(gaps)  # and nearly always the very argmax
    firsts = {tuple(r.generated) for r in requests if r.prompt_ids == requests[0].prompt_ids}
    assert len(firsts) == 4  # the adapters really differ


@pytest.mark.parametrize(
    ("flags", "precision", "base", "adapters"),
    [
        ([], "auto", None, torch.float32),  # as lorakit.precision.decide resolves it on this CPU
        (["--precision", "fp32"], "fp32", torch.float32, torch.float32),
        (["--precision", "bf16-mixed"], "bf16-mixed", torch.bfloat16, torch.float32),
        (["--precision", "bf16"], "bf16", torch.bfloat16, torch.bfloat16),
        (["--dtype", "bfloat16"], "bf16", torch.bfloat16, torch.bfloat16),  # the deprecated alias
    ],
)
def test_serve_precision_loads_the_base_and_adapters_in_its_dtypes(
    precision_lm, monkeypatch, capsys, flags, precision, base, adapters
):
    from fastapi.testclient import TestClient

    from lorakit.cli import serve as serve_cli
    from lorakit.precision import decide

    apps = []
    monkeypatch.setattr(serve_cli, "serve_forever", lambda app, engine, **kw: apps.append(app))
    args = ["serve", "--model", str(precision_lm["model"]), "--adapter", f"a={precision_lm['adapters']['a']}"]
    args += ["--adapter-dir", str(precision_lm["adapters"]["b"].parent), "--weights", "precision"]
    assert main([*args, *flags]) == 0
    if precision == "auto":
        resolved = decide("auto", "cpu")
        precision, base = resolved.name, resolved.storage
    err = capsys.readouterr().err
    assert f"precision: {precision}" in err
    assert ("--dtype is deprecated; --dtype bfloat16 is --precision bf16" in err) == ("--dtype" in flags)
    state = apps[0].state.lorakit
    model = state.engine.model
    assert state.engine.precision.name == precision
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {base}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {adapters}
    with TestClient(apps[0]) as http:  # the app's lifespan starts and stops the engine
        assert http.post("/v1/adapters", json={"name": "b"}).status_code == 200  # loaded at run time: alike
        body = {"model": "b", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    assert {p.dtype for n, p in model.named_parameters() if ".b." in n} == {adapters}


def test_serve_int8_weights_keep_adapters_float_and_load_more_at_run_time(precision_lm, monkeypatch, capsys):
    from fastapi.testclient import TestClient

    from lorakit.cli import serve as serve_cli
    from lorakit.weights import Int8Linear

    apps = []
    monkeypatch.setattr(serve_cli, "serve_forever", lambda app, engine, **kw: apps.append(app))
    args = ["serve", "--model", str(precision_lm["model"]), "--adapter", f"a={precision_lm['adapters']['a']}"]
    args += ["--adapter-dir", str(precision_lm["adapters"]["b"].parent), "--precision", "bf16-mixed"]
    assert main([*args, "--weights", "int8"]) == 0
    banner = capsys.readouterr().err
    assert "weights: int8 (as asked); 15 linear layers" in banner
    assert "decode: lorakit's decode step for llama" in banner
    model = apps[0].state.lorakit.engine.model
    assert {type(m) for n, m in model.named_modules() if n.endswith(("q_proj.base_layer", "lm_head"))} == {Int8Linear}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    with TestClient(apps[0]) as http:
        assert http.post("/v1/adapters", json={"name": "b"}).status_code == 200  # beside the int8 layers
        replies = [http.post("/v1/completions", json={"model": m, "prompt": PROMPTS[0], "max_tokens": 6,
                                                       "temperature": 0}).json() for m in ("a", "b", "lm")]  # fmt: skip
    assert all(r["usage"]["completion_tokens"] >= 1 for r in replies)
    assert {p.dtype for n, p in model.named_parameters() if ".b." in n} == {torch.float32}


def test_serve_precision_errors_are_one_line(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path), "--precision", "fp16-mixed"]) == 2
    assert "fp16-mixed needs a CUDA device" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--precision", "bf16", "--dtype", "float32"]) == 2
    assert "--dtype is replaced by --precision; give only --precision" in capsys.readouterr().err


@pytest.mark.parametrize("signum, ignored", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)])
def test_the_server_decodes_on_its_main_thread_and_stops_cleanly_on_a_signal(tmp_path, tiny_tokenizer, signum, ignored):
    """The engine's loop runs on the main thread (uvicorn on its own): a signal ends both, exit status 0, with a
    request streaming at the time answered (its stream ends) rather than left hanging; SIGINT too when the server
    was started with SIGINT ignored (a background job of a non-interactive shell)."""
    model_dir = save_tiny_lm(tmp_path / "lm", tiny_tokenizer, max_position_embeddings=4096)
    port = free_port()
    proc = _start(["--model", str(model_dir), "--port", str(port), "--max-tokens", "4000"], port, ignore_sigint=ignored)
    try:
        assert raw(port, "POST", "/v1/completions", json.dumps({"model": "lm", "prompt": "the", "max_tokens": 3,
                                                                 "temperature": 0}).encode())[0] == 200  # fmt: skip
        body = json.dumps({"model": "lm", "prompt": "the colour", "max_tokens": 4000, "stream": True,
                           "ignore_eos": True}).encode()  # fmt: skip
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as stream:
            stream.readline()  # streaming has begun
            proc.send_signal(signum)
            rest = stream.read().decode()  # the stream ends (no hang) once the server answers and shuts down
        assert proc.wait(timeout=30) == 0
        assert "[DONE]" in rest or "shutting down" in rest or rest == ""
    finally:
        if proc.poll() is None:
            proc.kill()
