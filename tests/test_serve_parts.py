"""The server's parts on their own, without a process or an engine: formatters, admission, error bodies."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lorakit.serve import formatters
from lorakit.serve.engine import Event
from lorakit.serve.formatters import Reply
from lorakit.serve.handlers import check_admission
from lorakit.serve.schemas import ApiError, ChatBody, CompletionBody, Message, ServeLimits, error_body


def test_completion_prompts_take_text_ids_and_lists_and_name_bad_ids(tiny_tokenizer):
    text = formatters.completion_prompts("the colour", tiny_tokenizer)
    assert text == [tiny_tokenizer("the colour")["input_ids"]]
    assert formatters.completion_prompts([3, 4], tiny_tokenizer) == [[3, 4]]
    assert formatters.completion_prompts([[3], [4, 5]], tiny_tokenizer) == [[3], [4, 5]]
    with pytest.raises(ApiError, match=r"token ids \[99999\] are outside the vocabulary") as err:
        formatters.completion_prompts([[1, 99999]], tiny_tokenizer)
    assert err.value.status == 400 and err.value.param == "prompt"
    with pytest.raises(ApiError, match="prompt is empty"):
        formatters.completion_prompts("", tiny_tokenizer)


def test_chat_prompt_renders_developer_as_system_and_refuses_empty_chats():
    seen = {}

    class Tokenizer:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            seen["messages"] = messages
            return "rendered"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [7, 8]}

    ids = formatters.chat_prompt([Message(role="developer", content="be brief")], Tokenizer())
    assert ids == [7, 8] and seen["messages"] == [{"role": "system", "content": "be brief"}]
    with pytest.raises(ApiError, match="every message is empty"):
        formatters.chat_prompt([Message(role="user", content="")], Tokenizer())


def test_response_and_chunks_have_openais_shapes():
    chat = Reply("chatcmpl-1", "a", chat=True, n=1, include_usage=True)
    body = formatters.response(chat, ["hi"], ["stop"], 3, 1)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "hi",
    }
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    opening = json.loads(formatters.opening_chunk(chat, 2).removeprefix("data: "))
    assert [c["delta"] for c in opening["choices"]] == [{"role": "assistant", "content": ""}] * 2
    assert opening["object"] == "chat.completion.chunk" and "usage" in opening
    text = Reply("cmpl-1", "b", chat=False, n=1)
    part = json.loads(formatters.event_chunk(text, 0, Event(text="yo", finish_reason="length")).removeprefix("data: "))
    assert part["choices"] == [{"index": 0, "text": "yo", "finish_reason": "length", "logprobs": None}]
    assert "usage" not in part and part["object"] == "text_completion"
    error = json.loads(formatters.error_chunk(Event(error="timed out", error_status=408)).removeprefix("data: "))
    assert error == error_body(408, "timed out") and error["error"]["type"] == "invalid_request_error"


def test_admission_names_the_limit_and_the_field():
    state = SimpleNamespace(limits=ServeLimits(max_tokens=10, max_n=2), context_length=20)
    body = CompletionBody(model="m", prompt="x")
    check_admission(state, body, [[1, 2]], 10)
    with pytest.raises(ApiError, match="max_tokens=11 exceeds this server's limit of 10") as err:
        check_admission(state, body, [[1, 2]], 11)
    assert err.value.param == "max_tokens"
    with pytest.raises(ApiError, match="n x prompts = 3 exceeds the limit of 2"):
        check_admission(state, CompletionBody(model="m", prompt="x", n=3), [[1]], 5)
    with pytest.raises(ApiError, match="exceeds the model's context length of 20") as err:
        check_admission(state, body, [[1] * 15], 6)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(ApiError, match="stop takes up to 16 non-empty strings"):
        check_admission(state, ChatBody(model="m", messages=[{"role": "user", "content": "q"}], stop=[""]), [[1]], 5)


# ----- --precision (issue 28) ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "name"),
    [
        ([], "auto"),
        (["--precision", "bf16-mixed"], "bf16-mixed"),
        (["--dtype", "float32"], "fp32"),
        (["--dtype", "bfloat16"], "bf16"),
        (["--dtype", "float16"], "fp16-mixed"),
        (["--precision", "auto", "--dtype", "float32"], "fp32"),  # auto is the default: the alias decides
    ],
)
def test_serve_precision_flags_and_the_deprecated_dtype(capsys, flags, name):
    from lorakit.cli.main import build_parser
    from lorakit.cli.serve import precision_name

    assert precision_name(build_parser().parse_args(["serve", *flags])) == name
    note = f"lorakit serve: --dtype is deprecated; {' '.join(flags[-2:])} is --precision {name}\n"
    assert capsys.readouterr().err == (note if "--dtype" in flags else "")  # one line, for the alias only


def test_serve_precision_refuses_both_flags_and_unknown_names(capsys):
    from lorakit.cli.main import build_parser
    from lorakit.cli.serve import precision_name

    with pytest.raises(ValueError, match="--dtype is replaced by --precision; give only --precision"):
        precision_name(build_parser().parse_args(["serve", "--precision", "bf16", "--dtype", "bfloat16"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_the_mailbox_delivers_a_batch_of_events_with_one_wake_up_and_in_order():
    """Events put from another thread reach their queues in order; a batch put before the loop runs costs one
    ``call_soon_threadsafe``; events an interrupted put left waiting are delivered by ``drain``; the mailbox does
    not keep its loop alive."""
    import asyncio
    import gc
    import threading
    import weakref

    from lorakit.serve import handlers
    from lorakit.serve.engine import Event

    loop = asyncio.new_event_loop()
    wakes = []
    original = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: wakes.append(1) or original(*a)
    queues = [asyncio.Queue(), asyncio.Queue()]
    box = handlers.mailbox(loop)
    assert handlers.mailbox(loop) is box

    def engine_step():
        for k in range(6):
            box.put(queues[k % 2], (k, Event(text=str(k))))

    thread = threading.Thread(target=engine_step)
    thread.start()
    thread.join()
    loop.run_until_complete(asyncio.sleep(0))
    assert len(wakes) == 1
    got = [[q.get_nowait()[0] for _ in range(q.qsize())] for q in queues]
    assert got == [[0, 2, 4], [1, 3, 5]]
    box.put(queues[0], (6, Event()))
    loop.run_until_complete(asyncio.sleep(0))
    assert len(wakes) == 2 and queues[0].get_nowait()[0] == 6
    # a put interrupted (Ctrl-C on the engine's main thread) after raising the flag, before scheduling: later puts
    # schedule nothing, and drain (what collect_events calls when its queue stays empty) delivers them all
    box._scheduled = True
    box.put(queues[1], (7, Event()))
    box.put(queues[1], (8, Event()))
    loop.run_until_complete(asyncio.sleep(0))
    assert len(wakes) == 2 and queues[1].empty()
    box.drain()
    assert [queues[1].get_nowait()[0] for _ in range(2)] == [7, 8]
    box.put(queues[0], (9, Event()))  # and the next put schedules a delivery again
    loop.run_until_complete(asyncio.sleep(0))
    assert len(wakes) == 3 and queues[0].get_nowait()[0] == 9
    loop.close()
    other = asyncio.new_event_loop()
    handlers.mailbox(other).put(asyncio.Queue(), (0, Event()))
    ref = weakref.ref(other)
    other.close()
    del other
    gc.collect()
    assert ref() is None


def test_the_guard_counts_every_answer_including_refusals_and_unexpected_errors(tiny_lm_dir, monkeypatch):
    """The admission guard (a pure ASGI middleware) refuses a missing key (401) and an oversized body (413) before
    any handler, passes the rest through, and counts each answer by endpoint and status in /metrics, an
    unexpected error in a handler as 500 (answered with OpenAI's error body)."""
    from fastapi.testclient import TestClient

    import lorakit
    from lorakit.serve.api import create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import AdapterRegistry
    from lorakit.serve.schemas import ServeLimits

    model, tokenizer = lorakit.load_model(tiny_lm_dir)
    engine = Engine(model, tokenizer)
    registry = AdapterRegistry(model, engine, "lm")
    app = create_app(engine, registry, tokenizer, limits=ServeLimits(max_body_bytes=64), api_key="k")
    key = {"Authorization": "Bearer k"}
    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.post("/v1/completions", content=b"x" * 100, headers=key).status_code == 413
        assert http.get("/v1/models", headers=key).json()["data"][0]["id"] == "lm"
        with monkeypatch.context() as patch:
            patch.setattr(registry, "names", lambda: 1 / 0)
            failed = http.get("/v1/models", headers=key)
        assert failed.status_code == 500 and "ZeroDivisionError" in failed.json()["error"]["message"]
        text = http.get("/metrics", headers=key).text
    for status, count in (("401", 1), ("413", 1), ("200", 1), ("500", 1)):
        endpoint = "/v1/completions" if status == "413" else "/v1/models"
        assert f'lorakit_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}.0' in text, status
