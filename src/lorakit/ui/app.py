"""The dashboard's HTTP app: routes to the handlers (``lorakit.ui.handlers``), admission, and error responses.

Admission, before any handler: with a token, every request must carry it (``Authorization: Bearer``, or
the cookie the page receives after opening ``/?token=...``), compared in constant time; without one (the
dashboard then listens on a loopback address only) the Host header must name this machine, which stops a
web page from reaching the API through DNS rebinding. A request that changes something and comes from a
page of another origin is refused either way. Errors are ``{"error": message}`` with a 4xx status, and
``{"error", "errors": {field: message}}`` for a form.
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..serve.registry import AdapterError
from . import handlers as h
from .chat import ChatService
from .handlers import UiError, UiState, state_of
from .runs import Conflict, NotFound, PathRefused, Workspace

COOKIE = "lorakit_ui_token"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}

RUN = "/api/runs/{name:path}"
ROUTES: list[tuple[str, str, Any, dict]] = [  # the suffixed run routes come before the bare one that would match them
    ("GET", "/", h.index, {}),
    ("GET", "/favicon.ico", h.favicon, {}),
    ("GET", "/static/{name}", h.static, {}),
    ("GET", "/api/info", h.info, {}),
    ("GET", "/api/runs", h.runs, {}),
    ("POST", "/api/runs", h.launch, {"status_code": 201}),
    ("GET", RUN + "/metrics", h.metrics, {}),
    ("GET", RUN + "/events", h.events, {}),
    ("GET", RUN + "/config.yaml", h.config_file, {}),
    ("GET", RUN + "/log", h.log, {}),
    ("POST", RUN + "/stop", h.stop, {}),
    ("POST", RUN + "/resume", h.resume, {}),
    ("GET", RUN + "/inspect", h.inspect, {}),
    ("GET", RUN + "/compare", h.compare, {}),
    ("GET", RUN, h.details, {}),
    ("DELETE", RUN, h.delete, {}),
    ("GET", "/api/form", h.form, {}),
    ("POST", "/api/form/check", h.check, {}),
    ("GET", "/api/chat/models", h.chat_models, {}),
    ("POST", "/api/chat", h.chat, {}),
]


def plotly_js() -> Path:
    """plotly.js, as the plotly package ships it (the charts of the page; no hand-written chart code)."""
    spec = importlib.util.find_spec("plotly")
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ValueError("lorakit ui draws its charts with plotly: pip install 'lorakit[ui]' (or 'plotly>=5')")
    return path


def create_app(ws: Workspace, model: str = "default", *, token: str | None = None, host: str = "127.0.0.1") -> FastAPI:
    """The dashboard over ``ws``, chatting with ``model``. ``token``: required on every request when set.
    Stopping the app stops the runs it launched (each writes a checkpoint) and the chat engine."""
    state = UiState(ws, ChatService(ws, model), model, plotly_js(), token, host)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(state.chat.close)
        await asyncio.to_thread(ws.close)

    app = FastAPI(title="lorakit ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = state
    app.middleware("http")(guard)
    for kind, handler in ERROR_HANDLERS:
        app.add_exception_handler(kind, handler)
    for method, path, handler, options in ROUTES:
        app.add_api_route(path, handler, methods=[method], include_in_schema=False, **options)
    return app


async def guard(request: Request, call_next):
    """Admission (see the module docstring); the token given once in ``/?token=`` becomes a cookie."""
    state = state_of(request)
    refused = admission(request, state.token, state.host)
    if refused is not None:
        return refused
    if state.token and request.url.path == "/" and request.query_params.get("token"):
        response = RedirectResponse("/", status_code=303)  # the token leaves the address bar for a cookie
        response.set_cookie(COOKIE, state.token, httponly=True, samesite="strict")
        return response
    return await call_next(request)


def admission(request: Request, token: str | None, host: str) -> JSONResponse | None:
    """The refusal for a request that may not pass, or None."""
    headers = request.headers
    if token:
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            supplied = auth[7:]
        elif request.url.path == "/" and request.query_params.get("token"):
            supplied = request.query_params["token"]
        else:
            supplied = request.cookies.get(COOKIE, "")
        if not secrets.compare_digest(supplied.encode(), token.encode()):
            return JSONResponse(
                {"error": "missing or wrong token: open the dashboard at /?token=TOKEN, or send 'Authorization: "
                 "Bearer TOKEN'"},
                status_code=401,
            )  # fmt: skip
    else:
        name = urlsplit("//" + headers.get("host", "")).hostname or ""
        if name not in LOOPBACK and name != host:
            return JSONResponse({"error": f"Host {name!r} refused: the dashboard answers on {host} only"}, 403)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        origin = headers.get("origin")
        if origin and urlsplit(origin).netloc != headers.get("host"):
            return JSONResponse({"error": f"cross-origin request from {origin} refused"}, status_code=403)
    return None


# ----- errors ------------------------------------------------------------------------------------------------
async def on_ui_error(request: Request, err: UiError):
    body: dict[str, Any] = {"error": err.message}
    if err.errors is not None:
        body["errors"] = err.errors
    return JSONResponse(body, status_code=err.status)


async def on_validation(request: Request, err: RequestValidationError):
    parts = [f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body') or 'body'}: {p.get('msg')}"
             for p in err.errors()[:5]]  # fmt: skip
    return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=400)


async def on_http(request: Request, err: StarletteHTTPException):
    message = "no such page or endpoint" if err.status_code == 404 else str(err.detail)
    return JSONResponse({"error": message}, status_code=err.status_code)


async def on_adapter_error(request: Request, err: AdapterError):
    return JSONResponse({"error": str(err)}, status_code=err.status)


def with_status(status: int):
    async def handle(request: Request, err: Exception):
        return JSONResponse({"error": str(err)}, status_code=status)

    return handle


ERROR_HANDLERS = [
    (UiError, on_ui_error),
    (RequestValidationError, on_validation),
    (StarletteHTTPException, on_http),
    (AdapterError, on_adapter_error),
    (NotFound, with_status(404)),
    (PathRefused, with_status(403)),
    (Conflict, with_status(409)),
    (ValueError, with_status(400)),
]
