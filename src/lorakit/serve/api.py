"""OpenAI-compatible HTTP API over the engine: completions, chat, models, adapters, health, metrics.

Every error has OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: bad requests get a 4xx
status (400 for malformed JSON, wrong types and out-of-range values, 401 without the API key, 404 for an
unknown model, 413 for an oversized body, 429 when the queue is full), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Event, QueueFull, SamplingParams
from .engine import Request as EngineRequest
from .registry import AdapterError, AdapterRegistry


@dataclass
class ServeLimits:
    """Admission limits (the engine holds batch size and queue length)."""

    max_tokens: int = 512  # most new tokens one request may ask for
    timeout_s: float = 300.0  # wall time from arrival to the last token
    max_body_bytes: int = 1 << 20
    max_n: int = 8  # most choices per request


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(
        status, "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


# ----- request bodies ------------------------------------------------------------------------------------------
Stop = StrictStr | list[StrictStr] | None
Temperature = Annotated[float, Field(ge=0.0, le=2.0, strict=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: StrictInt = Field(default=1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: generate exactly max_tokens tokens
    logprobs: Any = None


class CompletionBody(_Common):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


class LoadAdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    path: StrictStr | None = None


# ----- the app -------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one app: requests, tokens, latency, queue depth, running batch, adapters."""

    def __init__(self, engine: Engine, adapters: AdapterRegistry) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorakit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("lorakit_completion_tokens", "tokens generated", registry=r)
        self.latency = Histogram(
            "lorakit_request_latency_seconds",
            "time from arrival to the last token",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.first_token = Histogram(
            "lorakit_time_to_first_token_seconds", "time from arrival to the first token", registry=r
        )
        Gauge("lorakit_queue_depth", "requests waiting for a batch slot", registry=r).set_function(
            lambda: engine.queue_depth
        )
        Gauge("lorakit_running_requests", "requests in the running batch", registry=r).set_function(
            lambda: engine.running
        )
        Gauge("lorakit_adapters_loaded", "adapters available", registry=r).set_function(lambda: len(adapters.names()))
        Gauge("lorakit_engine_steps", "forward passes run by the engine", registry=r).set_function(lambda: engine.steps)


def create_app(
    engine: Engine,
    adapters: AdapterRegistry,
    tokenizer,
    *,
    limits: ServeLimits | None = None,
    api_key: str | None = None,
    context_length: int | None = None,
) -> FastAPI:
    """The FastAPI app. The engine is started and stopped with the app's lifespan."""
    limits = limits or ServeLimits()
    metrics = Metrics(engine, adapters)
    base_name = adapters.base_name
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        endpoint = _endpoint(request)
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        if length > limits.max_body_bytes:
            response = error_response(
                413, f"request body of {length} bytes exceeds the limit of {limits.max_body_bytes}"
            )
        elif api_key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {api_key}":
            response = error_response(
                401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        else:
            response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, err: RequestValidationError):
        problems = err.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        parts = []
        for p in problems[:5]:
            loc = ".".join(str(x) for x in p.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {p.get('msg')}")
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return error_response(400, "invalid request: " + "; ".join(parts), param=param)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError):
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(AdapterError)
    async def on_adapter_error(request: Request, err: AdapterError):
        return error_response(err.status, str(err), code=err.code)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, err: StarletteHTTPException):
        message = "no such endpoint" if err.status_code == 404 else str(err.detail)
        return error_response(err.status_code, message)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception):
        return error_response(500, f"internal error: {type(err).__name__}: {err}")

    # ----- endpoints -------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "lorakit", "parent": None}]
        data += [
            {
                "id": n,
                "object": "model",
                "created": created,
                "owned_by": "lorakit",
                "parent": base_name,
                "root": adapters.source(n),
            }
            for n in adapters.names()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(body: LoadAdapterBody):
        name = await adapters.load(body.name, body.path)
        return {"id": name, "object": "model", "parent": base_name, "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await adapters.unload(name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        if body.echo:
            raise ApiError(400, "echo is not supported; drop it from the request", param="echo")
        _refuse_logprobs(body.logprobs)
        adapter = adapters.resolve_model(body.model)
        prompts = _completion_prompts(body.prompt, tokenizer)
        default = 16  # OpenAI's default for /v1/completions
        return await _generate(request, body, adapter, prompts, body.max_tokens or default, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        _refuse_logprobs(body.logprobs)
        adapter = adapters.resolve_model(body.model)
        ids = _chat_prompt(body.messages, tokenizer)
        asked = body.max_completion_tokens or body.max_tokens
        default = (
            limits.max_tokens if context_length is None else max(1, min(limits.max_tokens, context_length - len(ids)))
        )
        return await _generate(request, body, adapter, [ids], asked or default, chat=True)

    # ----- generation ------------------------------------------------------------------------------------------
    async def _generate(
        request: Request, body: _Common, adapter, prompts: list[list[int]], max_tokens: int, chat: bool
    ):
        started = time.monotonic()
        if max_tokens > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens}; ask for fewer",
                param="max_tokens",
            )
        if body.n * len(prompts) > limits.max_n:
            raise ApiError(400, f"n x prompts = {body.n * len(prompts)} exceeds the limit of {limits.max_n}", param="n")
        for ids in prompts:
            if context_length is not None and len(ids) + max_tokens > context_length:
                raise ApiError(
                    400,
                    f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context length "
                    f"of {context_length}; shorten the prompt or lower max_tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 16 non-empty strings", param="stop")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
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
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))

                requests.append(EngineRequest(ids, adapter, params, sink, timeout_s=limits.timeout_s))
        try:
            for req in requests:
                engine.submit(req)
        except QueueFull as err:
            for req in requests:
                req.cancel()
            raise ApiError(429, f"the server is busy: {err}; retry later", code="queue_full") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        model = body.model
        events = _events(requests, queue, request, started)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _sse(events, rid, model, chat, include_usage, body.n, requests, started)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = [""] * len(requests)
        finish: list[str | None] = [None] * len(requests)
        usage = [0, 0]
        async for index, event in events:
            if event.error:
                raise ApiError(event.error_status, event.error, code="timeout" if event.error_status == 408 else None)
            texts[index] += event.text
            if event.finish_reason:
                finish[index] = event.finish_reason
                usage[0] += event.prompt_tokens if index % body.n == 0 else 0
                usage[1] += event.completion_tokens
        metrics.latency.labels(_endpoint(request)).observe(time.monotonic() - started)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f, "logprobs": None}
            if chat
            else {"index": i, "text": t, "finish_reason": f, "logprobs": None}
            for i, (t, f) in enumerate(zip(texts, finish, strict=True))
        ]
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": _usage(*usage),
        }

    async def _events(
        requests: list[EngineRequest], queue: asyncio.Queue, request: Request, started: float
    ) -> AsyncIterator[tuple[int, Event]]:
        """Events of all of a request's choices until each finishes; the client leaving cancels the work."""
        pending = len(requests)
        first = True
        try:
            while pending:
                try:
                    index, event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
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

    async def _sse(events, rid, model, chat, include_usage, n, requests, started) -> AsyncIterator[str]:
        created_at = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        usage = [0, 0]

        def chunk(choices, usage_value=None) -> str:
            payload = {"id": rid, "object": kind, "created": created_at, "model": model, "choices": choices}
            if include_usage:
                payload["usage"] = usage_value
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat:
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                            "logprobs": None,
                        }
                        for i in range(len(requests))
                    ]
                )
            async for index, event in events:
                if event.error:
                    yield f"data: {json.dumps(error_body(event.error_status, event.error))}\n\n"
                    return
                if event.finish_reason:
                    usage[0] += event.prompt_tokens if index % n == 0 else 0  # once per prompt, not per choice
                    usage[1] += event.completion_tokens
                if not event.text and not event.finish_reason:
                    continue
                if chat:
                    delta = {"content": event.text} if event.text else {}
                    yield chunk(
                        [{"index": index, "delta": delta, "finish_reason": event.finish_reason, "logprobs": None}]
                    )
                else:
                    yield chunk(
                        [{"index": index, "text": event.text, "finish_reason": event.finish_reason, "logprobs": None}]
                    )
            if include_usage:
                yield chunk([], _usage(*usage))
            yield "data: [DONE]\n\n"
            metrics.latency.labels("/v1/chat/completions" if chat else "/v1/completions").observe(
                time.monotonic() - started
            )
        finally:
            for req in requests:
                req.cancel()

    return app


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _endpoint(request: Request) -> str:
    path = request.url.path
    if path.startswith("/v1/adapters"):
        return "/v1/adapters"
    known = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
    return path if path in known else "other"


def _refuse_logprobs(value) -> None:
    if value not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported by this server; drop the field", param="logprobs")


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]  # one prompt, as text or as token ids
    if not prompt:
        raise ApiError(400, "prompt is empty; send some text", param="prompt")
    out: list[list[int]] = []
    vocab = len(tokenizer)
    for item in prompt:
        if isinstance(item, str):
            if not item:
                raise ApiError(400, "prompt is empty; send some text", param="prompt")
            ids = tokenizer(item)["input_ids"]
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param="prompt")
        if not ids:
            raise ApiError(400, "prompt is empty after tokenization; send some text", param="prompt")
        out.append(ids)
    return out


def _chat_prompt(messages: list[Message], tokenizer) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    rendered = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        rendered.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if not any(m["content"] for m in rendered):
        raise ApiError(400, "every message is empty; send some text", param="messages")
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # the template's own checks (role order, ...) speak in jinja exceptions
        raise ApiError(400, f"the chat template refused these messages: {err}", param="messages") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ApiError(400, "the rendered chat prompt is empty", param="messages")
    return ids
