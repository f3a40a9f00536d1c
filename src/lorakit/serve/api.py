"""The OpenAI-compatible HTTP app: routes, admission (body size, API key) and error responses.

``create_app`` wires the handlers (``lorakit.serve.handlers``) to their routes over one ``ServerState``.
Every error has OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: bad requests get a 4xx
status (400 for malformed JSON, wrong types and out-of-range values, 401 without the API key, 404 for an
unknown model, 413 for an oversized body, 429 when the queue is full), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import handlers
from .engine import Engine
from .handlers import ServerState, endpoint
from .metrics import Metrics
from .registry import AdapterError, AdapterRegistry
from .schemas import ApiError, ServeLimits, error_response

ROUTES = [
    ("GET", "/health", handlers.health),
    ("GET", "/metrics", handlers.prometheus),
    ("GET", "/v1/models", handlers.list_models),
    ("POST", "/v1/adapters", handlers.load_adapter),
    ("DELETE", "/v1/adapters/{name}", handlers.unload_adapter),
    ("POST", "/v1/completions", handlers.completions),
    ("POST", "/v1/chat/completions", handlers.chat),
]


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
    state = ServerState(
        engine, adapters, tokenizer, limits or ServeLimits(), Metrics(engine, adapters), api_key, context_length
    )
    state.created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lorakit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lorakit = state
    app.state.metrics = state.metrics
    app.add_middleware(Guard, state=state)
    for kind, handler in ERROR_HANDLERS:
        app.add_exception_handler(kind, handler)
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return app


class Guard:
    """Admission before any handler: the body size limit and the API key; counts every response (an unhandled
    error as 500). A pure ASGI middleware: a streamed response's chunks pass straight through (Starlette's
    ``BaseHTTPMiddleware`` moved each one through a memory stream and a task of its own, work on the HTTP thread
    for every token of every stream)."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        state = self.state
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        key = state.api_key
        status = [500]

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if length > state.limits.max_body_bytes:
                message = f"request body of {length} bytes exceeds the limit of {state.limits.max_body_bytes}"
                await error_response(413, message)(scope, receive, counted)
            elif key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {key}":
                message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                await error_response(401, message, code="invalid_api_key")(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            state.metrics.requests.labels(endpoint(request), str(status[0])).inc()


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


async def on_api_error(request: Request, err: ApiError):
    return error_response(err.status, err.message, err.param, err.code)


async def on_adapter_error(request: Request, err: AdapterError):
    return error_response(err.status, str(err), code=err.code)


async def on_http(request: Request, err: StarletteHTTPException):
    message = "no such endpoint" if err.status_code == 404 else str(err.detail)
    return error_response(err.status_code, message)


async def on_unexpected(request: Request, err: Exception):
    return error_response(500, f"internal error: {type(err).__name__}: {err}")


ERROR_HANDLERS = [
    (RequestValidationError, on_validation),
    (ApiError, on_api_error),
    (AdapterError, on_adapter_error),
    (StarletteHTTPException, on_http),
    (Exception, on_unexpected),
]
