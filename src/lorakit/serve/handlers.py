"""The server's endpoints as module-level functions over one application state (``request.app.state.lorakit``).

Each handler reads the ``ServerState`` that ``create_app`` put on the app: the engine, the adapter registry,
the tokenizer, the limits and the metrics. Generation submits one engine request per choice, then either
collects the events into one response or streams them as server-sent events.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import formatters
from .engine import Engine, Event, QueueFull, SamplingParams
from .engine import Request as EngineRequest
from .formatters import Reply
from .metrics import Metrics
from .registry import AdapterRegistry
from .schemas import ApiError, ChatBody, CompletionBody, GenerationBody, LoadAdapterBody, ServeLimits


@dataclass
class ServerState:
    """Everything the handlers read, set once by ``create_app``."""

    engine: Engine
    adapters: AdapterRegistry
    tokenizer: Any
    limits: ServeLimits
    metrics: Metrics
    api_key: str | None = None
    context_length: int | None = None
    created: int = 0

    @property
    def base_name(self) -> str:
        return self.adapters.base_name


class Mailbox:
    """Events from the engine thread to one event loop's queues with one wake-up of the loop per batch: the events
    a decode step produces for its rows (one per running request) arrive together, and waking the loop once for
    each (``call_soon_threadsafe``) made the HTTP thread compete with the engine for the GIL eight times a step.

    Lock-free (a deque and a flag): the engine runs on the main thread, where Ctrl-C raises KeyboardInterrupt
    between any two bytecodes, and a lock held at that moment would never be released. An interrupt between
    raising the flag and scheduling the delivery leaves events waiting; ``drain``, which ``collect_events`` calls
    whenever its queue stays empty for half a second, delivers them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # not a strong reference: the loop keys this mailbox in _MAILBOXES
        self._items: deque[tuple[asyncio.Queue, tuple[int, Event]]] = deque()
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: tuple[int, Event]) -> None:
        """(Any thread) deliver ``item`` to ``queue`` on the loop; the first of a batch schedules the delivery.
        The item is appended before the flag is read and ``drain`` lowers the flag before it takes the items, so an
        item whose put saw the flag raised is taken by the delivery that flag stands for."""
        self._items.append((queue, item))
        if self._scheduled:
            return
        self._scheduled = True
        loop = self._loop()
        if loop is not None:
            loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        """(The loop's thread) deliver every waiting event to its queue."""
        self._scheduled = False
        while self._items:
            queue, item = self._items.popleft()
            queue.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its Mailbox


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's mailbox (one per event loop, gone with it)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


def state_of(request: Request) -> ServerState:
    return request.app.state.lorakit


# ----- simple endpoints --------------------------------------------------------------------------------------
async def health(request: Request) -> dict:
    engine = state_of(request).engine
    return {"status": "ok", "running": engine.running, "waiting": engine.queue_depth}


async def prometheus(request: Request) -> Response:
    return Response(generate_latest(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request) -> dict:
    state = state_of(request)
    entry = {"object": "model", "created": state.created, "owned_by": "lorakit"}
    data = [{"id": state.base_name, **entry, "parent": None}]
    for name in state.adapters.names():
        data.append({"id": name, **entry, "parent": state.base_name, "root": state.adapters.source(name)})
    return {"object": "list", "data": data}


async def load_adapter(body: LoadAdapterBody, request: Request) -> dict:
    state = state_of(request)
    name = await state.adapters.load(body.name, body.path)
    return {"id": name, "object": "model", "parent": state.base_name, "loaded": True}


async def unload_adapter(name: str, request: Request) -> dict:
    await state_of(request).adapters.unload(name)
    return {"id": name, "object": "model", "deleted": True}


# ----- generation endpoints ----------------------------------------------------------------------------------
async def completions(body: CompletionBody, request: Request):
    state = state_of(request)
    if body.echo:
        raise ApiError(400, "echo is not supported; drop it from the request", param="echo")
    refuse_logprobs(body.logprobs)
    adapter = state.adapters.resolve_model(body.model)
    prompts = formatters.completion_prompts(body.prompt, state.tokenizer)
    default = 16  # OpenAI's default for /v1/completions
    return await generate(request, body, adapter, prompts, body.max_tokens or default, chat=False)


async def chat(body: ChatBody, request: Request):
    state = state_of(request)
    refuse_logprobs(body.logprobs)
    adapter = state.adapters.resolve_model(body.model)
    ids = formatters.chat_prompt(body.messages, state.tokenizer)
    asked = body.max_completion_tokens or body.max_tokens
    limit, context = state.limits.max_tokens, state.context_length
    default = limit if context is None else max(1, min(limit, context - len(ids)))
    return await generate(request, body, adapter, [ids], asked or default, chat=True)


def refuse_logprobs(value) -> None:
    if value not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported by this server; drop the field", param="logprobs")


async def generate(
    request: Request, body: GenerationBody, adapter: str | None, prompts: list[list[int]], max_tokens: int, chat: bool
):
    """Admit, submit one engine request per choice, and answer whole or streamed."""
    state = state_of(request)
    started = time.monotonic()
    check_admission(state, body, prompts, max_tokens)
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    requests = submit(state, body, adapter, prompts, max_tokens, queue)
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    reply = Reply(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, body.model, chat, body.n, include_usage)
    events = collect_events(state, requests, queue, request, started)
    if body.stream:
        stream = stream_events(state, reply, events, requests, started)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await whole_response(state, reply, events, len(requests), endpoint(request), started)


def check_admission(state: ServerState, body: GenerationBody, prompts: list[list[int]], max_tokens: int) -> None:
    """The limits a request must keep before it reaches the engine (400 with the field named)."""
    limits = state.limits
    if max_tokens > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens}; ask for fewer",
            "max_tokens",
        )
    if body.n * len(prompts) > limits.max_n:
        raise ApiError(400, f"n x prompts = {body.n * len(prompts)} exceeds the limit of {limits.max_n}", param="n")
    context = state.context_length
    for ids in prompts:
        if context is not None and len(ids) + max_tokens > context:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context length "
                f"of {context}; shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
    stops = stop_strings(body)
    if len(stops) > 16 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 16 non-empty strings", param="stop")


def stop_strings(body: GenerationBody) -> list[str]:
    """The request's ``stop``, one string or a list, as a list."""
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def submit(
    state: ServerState, body: GenerationBody, adapter: str | None, prompts: list[list[int]], max_tokens: int, queue
) -> list[EngineRequest]:
    """One engine request per (prompt, choice), its events sent to ``queue`` as (choice index, event)."""
    box = mailbox(asyncio.get_running_loop())
    stops = stop_strings(body)
    requests: list[EngineRequest] = []
    for p, ids in enumerate(prompts):
        for k in range(body.n):
            index = p * body.n + k
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                stop=stops,
                seed=None if body.seed is None else body.seed + index,
                ignore_eos=body.ignore_eos,
            )

            def sink(event: Event, index=index) -> None:
                box.put(queue, (index, event))

            requests.append(EngineRequest(ids, adapter, params, sink, timeout_s=state.limits.timeout_s))
    try:
        for req in requests:
            state.engine.submit(req)
    except QueueFull as err:
        for req in requests:
            req.cancel()
        raise ApiError(429, f"the server is busy: {err}; retry later", code="queue_full") from None
    return requests


async def collect_events(
    state: ServerState, requests: list[EngineRequest], queue: asyncio.Queue, request: Request, started: float
) -> AsyncIterator[tuple[int, Event]]:
    """Events of all of a request's choices until each finishes; the client leaving cancels the work."""
    metrics = state.metrics
    pending = len(requests)
    first = True
    try:
        while pending:
            if not queue.empty():  # a step's events often arrive together: no timer task for those already here
                index, event = queue.get_nowait()
            else:
                try:
                    index, event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    mailbox(asyncio.get_running_loop()).drain()  # events an interrupted put left waiting
                    if await request.is_disconnected():
                        return
                    continue
            if first and (event.text or event.finish_reason):
                metrics.first_token.observe(time.monotonic() - started)
                first = False
            if event.finish_reason or event.error:
                pending -= 1
                metrics.prompt_tokens.inc(event.prompt_tokens)
                metrics.completion_tokens.inc(event.completion_tokens)
            yield index, event
            if event.error:
                return
    finally:
        for req in requests:
            req.cancel()  # no-op for finished ones; stops the rest


async def whole_response(state: ServerState, reply: Reply, events, count: int, where: str, started: float) -> dict:
    texts = [""] * count
    finish: list[str | None] = [None] * count
    prompt_tokens = completion_tokens = 0
    async for index, event in events:
        if event.error:
            raise ApiError(event.error_status, event.error, code="timeout" if event.error_status == 408 else None)
        texts[index] += event.text
        if event.finish_reason:
            finish[index] = event.finish_reason
            prompt_tokens += event.prompt_tokens if index % reply.n == 0 else 0  # once per prompt, not per choice
            completion_tokens += event.completion_tokens
    state.metrics.latency.labels(where).observe(time.monotonic() - started)
    return formatters.response(reply, texts, finish, prompt_tokens, completion_tokens)


async def stream_events(
    state: ServerState, reply: Reply, events, requests: list[EngineRequest], started: float
) -> AsyncIterator[str]:
    prompt_tokens = completion_tokens = 0
    try:
        if reply.chat:
            yield formatters.opening_chunk(reply, len(requests))
        async for index, event in events:
            if event.error:
                yield formatters.error_chunk(event)
                return
            if event.finish_reason:
                prompt_tokens += event.prompt_tokens if index % reply.n == 0 else 0  # once per prompt
                completion_tokens += event.completion_tokens
            if event.text or event.finish_reason:
                yield formatters.event_chunk(reply, index, event)
        if reply.include_usage:
            yield formatters.chunk(reply, [], formatters.usage(prompt_tokens, completion_tokens))
        yield formatters.DONE
        where = "/v1/chat/completions" if reply.chat else "/v1/completions"
        state.metrics.latency.labels(where).observe(time.monotonic() - started)
    finally:
        for req in requests:
            req.cancel()


def endpoint(request: Request) -> str:
    """The endpoint a request counts under in the metrics."""
    path = request.url.path
    if path.startswith("/v1/adapters"):
        return "/v1/adapters"
    known = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
    return path if path in known else "other"
