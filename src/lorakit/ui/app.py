"""The dashboard's HTTP app: a JSON API over the workspace (runs, form, compare, inspect, chat) and the page.

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
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..analysis import inspect_adapter
from ..serve.registry import AdapterError
from . import forms
from .chat import BASE, MAX_COLUMNS, MAX_TOKENS, ChatService
from .runs import Conflict, NotFound, PathRefused, Workspace, progress_line, read_json

STATIC = Path(__file__).with_name("static")
COOKIE = "lorakit_ui_token"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
POLL_S = 0.5


class UiError(Exception):
    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


class FormBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    values: dict[str, Any] = Field(default_factory=dict)


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=20000)
    system: str | None = Field(default=None, max_length=20000)
    models: list[str] = Field(min_length=1, max_length=MAX_COLUMNS)
    max_tokens: int = Field(default=64, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = None


def plotly_js() -> Path:
    """plotly.js, as the plotly package ships it (the charts of the page; no hand-written chart code)."""
    spec = importlib.util.find_spec("plotly")
    path = Path(spec.origin).parent / "package_data" / "plotly.min.js" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ValueError("lorakit ui draws its charts with plotly: pip install 'lorakit[ui]' (or 'plotly>=5')")
    return path


def create_app(ws: Workspace, model: str = "default", *, token: str | None = None, host: str = "127.0.0.1") -> FastAPI:
    """The dashboard over ``ws``; chat with ``model``. ``token``: required on every request when set."""
    chart_js = plotly_js()
    chat = ChatService(ws, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(chat.close)
        await asyncio.to_thread(ws.close)

    app = FastAPI(title="lorakit ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ws, app.state.chat, app.state.model = ws, chat, model

    @app.middleware("http")
    async def guard(request: Request, call_next):
        refused = admission(request, token, host)
        if refused is not None:
            return refused
        if token and request.url.path == "/" and request.query_params.get("token"):
            response = RedirectResponse("/", status_code=303)  # the token leaves the address bar for a cookie
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response
        return await call_next(request)

    @app.exception_handler(UiError)
    async def on_ui_error(request: Request, err: UiError):
        body: dict[str, Any] = {"error": err.message}
        if err.errors is not None:
            body["errors"] = err.errors
        return JSONResponse(body, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, err: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body') or 'body'}: {p.get('msg')}"
                 for p in err.errors()[:5]]  # fmt: skip
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, err: StarletteHTTPException):
        message = "no such page or endpoint" if err.status_code == 404 else str(err.detail)
        return JSONResponse({"error": message}, status_code=err.status_code)

    # ----- page -------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name == "plotly.min.js":
            return FileResponse(chart_js, media_type="text/javascript")
        path = STATIC / name
        if name not in {p.name for p in STATIC.iterdir()}:
            raise UiError(404, f"no static file {name!r}")
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    # ----- runs -------------------------------------------------------------------------------------------
    @app.get("/api/info")
    async def info() -> dict:
        return {"version": __version__, "runs": str(ws.root), "data": str(ws.data_dir), "model": model,
                "chat": chat.state, "token": bool(token)}  # fmt: skip

    @app.get("/api/runs")
    async def runs() -> dict:
        items = []
        for name, kind in await asyncio.to_thread(ws.names):
            try:
                items.append(await asyncio.to_thread(ws.summary, name, kind))
            except (NotFound, PathRefused):
                continue
        return {"runs": items}

    @app.post("/api/runs", status_code=201)
    async def launch(body: FormBody) -> dict:
        if not body.name:
            raise UiError(422, "name the run", {"name": "give the run a name (its directory under the runs folder)"})
        result = forms.check_form(body.values, ws, model, name=body.name)
        if not result.ok:
            raise UiError(422, "the form has problems; see each field", result.errors)
        path = forms.launch_file(ws, body.name, result)
        process = await asyncio.to_thread(ws.launch, body.name, path)
        return {"name": body.name, "pid": process.pid, "config": ws.relative(path), "yaml": result.yaml}

    @app.get("/api/runs/{name:path}/metrics")
    async def metrics(name: str, since: int = 0) -> dict:
        return await asyncio.to_thread(ws.metrics, name, since)

    @app.get("/api/runs/{name:path}/events")
    async def events(name: str, request: Request, since: int = 0):
        ws.run_dir(name)
        return StreamingResponse(run_events(ws, name, since, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.get("/api/runs/{name:path}/config.yaml")
    async def config_file(name: str):
        d = ws.run_dir(name)
        for candidate in ("config.yaml", "launch.yaml", "compare-config.yaml"):
            if (d / candidate).is_file():
                return PlainTextResponse((d / candidate).read_text(encoding="utf-8"), media_type="application/yaml",
                                         headers={"Content-Disposition": f'attachment; filename="{candidate}"'})  # fmt: skip
        raise UiError(404, f"run {name!r} has no config file")

    @app.get("/api/runs/{name:path}/log")
    async def log(name: str) -> dict:
        text = ws.log_text(ws.run_dir(name))
        return {"log": text, "progress": progress_line(text)}

    @app.post("/api/runs/{name:path}/stop")
    async def stop(name: str) -> dict:
        return {"name": name, "signalled": await asyncio.to_thread(ws.stop, name)}

    @app.post("/api/runs/{name:path}/resume")
    async def resume(name: str) -> dict:
        d = ws.run_dir(name)
        await asyncio.to_thread(forms.config_paths_ok, d / "config.yaml", ws, model)
        process = await asyncio.to_thread(ws.resume, name)
        return {"name": name, "pid": process.pid}

    @app.get("/api/runs/{name:path}/inspect")
    async def inspect(name: str) -> dict:
        d = ws.run_dir(name)
        if not (d / "adapter_config.json").is_file():
            raise UiError(404, f"run {name!r} has no LoRA adapter to inspect")
        try:
            result = await asyncio.to_thread(inspect_adapter, d)
        except ValueError as err:
            raise UiError(422, f"cannot inspect run {name!r}: {err}") from None
        rows = [{**s.__dict__, "layer": s.layer_index, "module": s.module_type} for s in result.layers]
        return {"name": name, "top_k": result.top_k, "layers": rows}

    @app.get("/api/runs/{name:path}/compare")
    async def compare(name: str) -> dict:
        d = ws.run_dir(name)
        records = read_json(d / "results.json")
        if not isinstance(records, list):
            raise UiError(404, f"{name!r} is not a finished `lorakit compare` output (no results.json)")
        table = (d / "results.md").read_text(encoding="utf-8") if (d / "results.md").is_file() else ""
        return {"name": name, "records": records, "markdown": table}

    @app.get("/api/runs/{name:path}")
    async def details(name: str) -> dict:
        return await asyncio.to_thread(ws.details, name)

    # ----- form -------------------------------------------------------------------------------------------
    @app.get("/api/form")
    async def form() -> dict:
        return {
            "fields": forms.form_fields(model),
            "data_files": await asyncio.to_thread(ws.data_files),
            "model": model,
        }

    @app.post("/api/form/check")
    async def check(body: FormBody) -> dict:
        result = forms.check_form(body.values, ws, model, name=body.name)
        return {"ok": result.ok, "errors": result.errors, "yaml": result.yaml}

    # ----- chat -------------------------------------------------------------------------------------------
    @app.get("/api/chat/models")
    async def chat_models() -> dict:
        names = []
        for name, kind in await asyncio.to_thread(ws.names):
            if kind == "train":
                summary = await asyncio.to_thread(ws.summary, name, kind)
                if summary["has_adapter"]:
                    names.append({"name": name, "objective": summary["objective"], "model": summary["model"]})
        return {"base": model, "adapters": names, "state": chat.state}

    @app.post("/api/chat")
    async def chat_stream(body: ChatBody, request: Request):
        for m in body.models:
            if m != BASE:
                ws.run_dir(m)
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": body.prompt}
        ]
        try:
            columns = await chat.columns(body.models, messages)
        except ValueError as err:
            raise UiError(503 if chat.load_error else 400, str(err)) from None
        if chat.context and len(columns[0].prompt_ids or []) + body.max_tokens > chat.context:
            raise UiError(400, f"prompt + max_tokens exceed the model's context of {chat.context} tokens")
        stream = chat.stream(columns, body.max_tokens, body.temperature, body.seed)
        return StreamingResponse(sse(stream, request), media_type="text/event-stream")

    for kind, status in ((NotFound, 404), (PathRefused, 403), (Conflict, 409)):
        app.add_exception_handler(kind, _handler(status))
    app.add_exception_handler(AdapterError, lambda r, e: JSONResponse({"error": str(e)}, status_code=e.status))
    app.add_exception_handler(ValueError, _handler(400))
    return app


def _handler(status: int):
    async def handle(request: Request, err: Exception):
        return JSONResponse({"error": str(err)}, status_code=status)

    return handle


def admission(request: Request, token: str | None, host: str) -> JSONResponse | None:
    """The refusal for a request that may not pass (see the module docstring), or None."""
    headers = request.headers
    if token:
        supplied = ""
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


async def run_events(ws: Workspace, name: str, since: int, request: Request) -> AsyncIterator[str]:
    """Server-sent events of a run while it trains: new metrics records, the progress line, new log text and
    the state; one last event after it ends, then the stream closes."""
    d = ws.run_dir(name)
    offset = (d / "train.log").stat().st_size if (d / "train.log").is_file() else 0
    offset = max(0, offset - 4000)
    last_state = None
    while True:
        summary = await asyncio.to_thread(ws.summary, name)
        news = await asyncio.to_thread(ws.metrics, name, since)
        since = news["next"]
        text = ws.log_text(d, offset=offset)
        offset += len(text.encode("utf-8"))
        event = {"state": summary["state"], "resumable": summary.get("resumable", False),
                 "error": summary.get("error"), "step": summary.get("step"), "max_steps": summary.get("max_steps"),
                 "records": news["records"], "reset": news["reset"], "log": text,
                 "progress": progress_line(ws.log_text(d, 2000))}  # fmt: skip
        if news["records"] or text or event["state"] != last_state:
            yield f"data: {json.dumps(event)}\n\n"
        last_state = event["state"]
        if event["state"] != "running" or await request.is_disconnected():
            yield "event: end\ndata: {}\n\n"
            return
        await asyncio.sleep(POLL_S)


async def sse(events: AsyncIterator[dict[str, Any]], request: Request) -> AsyncIterator[str]:
    async for event in events:
        yield f"data: {json.dumps(event)}\n\n"
        if await request.is_disconnected():
            return
    yield "data: [DONE]\n\n"
