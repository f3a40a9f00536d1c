"""The dashboard's endpoints as module-level functions over one state (``request.app.state.ui``).

Each handler reads the ``UiState`` that ``create_app`` put on the app: the workspace (runs, data, launched
processes), the chat service and the dashboard's model. A refused request raises ``UiError`` (or one of the
workspace's errors), which the app answers as ``{"error": message}`` (plus ``"errors"`` per field for a form).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..analysis import inspect_adapter
from ..tools.compare import summarize
from . import forms
from .chat import BASE, MAX_COLUMNS, MAX_TOKENS, ChatService
from .runs import NotFound, PathRefused, Workspace, progress_line, read_json

STATIC = Path(__file__).with_name("static")
POLL_S = 0.5  # how often a run's event stream looks for new records


class UiError(Exception):
    """A refused request: ``status`` is the HTTP status, ``errors`` the problems of a form by field."""

    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


@dataclass
class UiState:
    """Everything the handlers read, set once by ``create_app``."""

    ws: Workspace
    chat: ChatService
    model: str
    chart_js: Path
    token: str | None = None
    host: str = "127.0.0.1"


def state_of(request: Request) -> UiState:
    return request.app.state.ui


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


# ----- the page ----------------------------------------------------------------------------------------------
async def index(request: Request):
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def favicon(request: Request):
    return Response(status_code=204)


async def static(name: str, request: Request):
    if name == "plotly.min.js":
        return FileResponse(state_of(request).chart_js, media_type="text/javascript")
    if name not in {p.name for p in STATIC.iterdir()}:
        raise UiError(404, f"no static file {name!r}")
    return FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})


async def info(request: Request) -> dict:
    s = state_of(request)
    return {"version": __version__, "runs": str(s.ws.root), "data": str(s.ws.data_dir), "model": s.model,
            "chat": s.chat.state, "token": bool(s.token)}  # fmt: skip


# ----- runs --------------------------------------------------------------------------------------------------
async def runs(request: Request) -> dict:
    ws = state_of(request).ws
    items = []
    for name, kind in await asyncio.to_thread(ws.names):
        try:
            items.append(await asyncio.to_thread(ws.summary, name, kind))
        except (NotFound, PathRefused):
            continue  # removed or replaced while listing
    return {"runs": items}


async def launch(body: FormBody, request: Request) -> dict:
    s = state_of(request)
    if not body.name:
        raise UiError(422, "name the run", {"name": "give the run a name (its directory under the runs folder)"})
    result = forms.check_form(body.values, s.ws, s.model, name=body.name)
    if not result.ok:
        raise UiError(422, "the form has problems; see each field", result.errors)
    path = forms.launch_file(s.ws, body.name, result)
    process = await asyncio.to_thread(s.ws.launch, body.name, path)
    return {"name": body.name, "pid": process.pid, "config": s.ws.relative(path), "yaml": result.yaml}


async def details(name: str, request: Request) -> dict:
    return await asyncio.to_thread(state_of(request).ws.details, name)


async def metrics(name: str, request: Request, since: int = 0) -> dict:
    return await asyncio.to_thread(state_of(request).ws.metrics, name, since)


async def events(name: str, request: Request, since: int = 0):
    ws = state_of(request).ws
    ws.run_dir(name)
    return StreamingResponse(run_events(ws, name, since, request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})  # fmt: skip


async def config_file(name: str, request: Request):
    ws = state_of(request).ws
    path = ws.config_file(ws.run_dir(name))
    if path is None:
        raise UiError(404, f"run {name!r} has no config file")
    return PlainTextResponse(path.read_text(encoding="utf-8"), media_type="application/yaml",
                             headers={"Content-Disposition": f'attachment; filename="{path.name}"'})  # fmt: skip


async def log(name: str, request: Request) -> dict:
    ws = state_of(request).ws
    text = ws.log_text(ws.run_dir(name))
    return {"log": text, "progress": progress_line(text)}


async def stop(name: str, request: Request) -> dict:
    return {"name": name, "signalled": await asyncio.to_thread(state_of(request).ws.stop, name)}


async def delete(name: str, request: Request) -> dict:
    await asyncio.to_thread(state_of(request).ws.delete, name)
    return {"name": name, "deleted": True}


async def resume(name: str, request: Request) -> dict:
    s = state_of(request)
    d = s.ws.run_dir(name)
    await asyncio.to_thread(forms.config_paths_ok, d / "config.yaml", s.ws, s.model)
    process = await asyncio.to_thread(s.ws.resume, name)
    return {"name": name, "pid": process.pid}


async def inspect(name: str, request: Request) -> dict:
    d = state_of(request).ws.run_dir(name)
    if not (d / "adapter_config.json").is_file():
        raise UiError(404, f"run {name!r} has no LoRA adapter to inspect")
    try:
        result = await asyncio.to_thread(inspect_adapter, d)
    except ValueError as err:
        raise UiError(422, f"cannot inspect run {name!r}: {err}") from None
    rows = [{**s.__dict__, "layer": s.layer_index, "module": s.module_type} for s in result.layers]
    return {"name": name, "top_k": result.top_k, "layers": rows}


async def compare(name: str, request: Request) -> dict:
    d = state_of(request).ws.run_dir(name)
    records = read_json(d / "results.json")
    if not isinstance(records, list):
        raise UiError(404, f"{name!r} is not a finished `lorakit compare` output (no results.json)")
    table = (d / "results.md").read_text(encoding="utf-8") if (d / "results.md").is_file() else ""
    # one row per method: over several seeds the mean (and ``*_sd``) of what varies, as results.md shows it
    return {"name": name, "records": summarize(records), "runs": records, "markdown": table}


async def run_events(ws: Workspace, name: str, since: int, request: Request) -> AsyncIterator[str]:
    """Server-sent events of a run while it trains: new metrics records, the progress line, new log text and
    the state; one last event after it ends, then the stream closes."""
    d = ws.run_dir(name)
    offset = max(0, ((d / "train.log").stat().st_size if (d / "train.log").is_file() else 0) - 4000)
    last_state = None
    tail = ""  # the end of the log seen so far: its last line is the progress bar
    while True:
        summary = await asyncio.to_thread(ws.summary, name)
        news = await asyncio.to_thread(ws.metrics, name, since)
        since = news["next"]
        text = ws.log_text(d, offset=offset)
        offset += len(text.encode("utf-8"))
        tail = (tail + text)[-2000:]
        event = {"state": summary["state"], "resumable": summary.get("resumable", False),
                 "error": summary.get("error"), "step": summary.get("step"), "max_steps": summary.get("max_steps"),
                 "records": news["records"], "reset": news["reset"], "log": text,
                 "progress": progress_line(tail)}  # fmt: skip
        if news["records"] or text or event["state"] != last_state:
            yield f"data: {json.dumps(event)}\n\n"
        last_state = event["state"]
        if event["state"] != "running" or await request.is_disconnected():
            yield "event: end\ndata: {}\n\n"
            return
        await asyncio.sleep(POLL_S)


# ----- the form ----------------------------------------------------------------------------------------------
async def form(request: Request) -> dict:
    s = state_of(request)
    return {"fields": forms.form_fields(s.model), "data_files": await asyncio.to_thread(s.ws.data_files),
            "model": s.model}  # fmt: skip


async def check(body: FormBody, request: Request) -> dict:
    s = state_of(request)
    result = forms.check_form(body.values, s.ws, s.model, name=body.name)
    return {"ok": result.ok, "errors": result.errors, "yaml": result.yaml}


# ----- chat --------------------------------------------------------------------------------------------------
async def chat_models(request: Request) -> dict:
    s = state_of(request)
    names = []
    for name, kind in await asyncio.to_thread(s.ws.names):
        if kind == "train":
            summary = await asyncio.to_thread(s.ws.summary, name, kind)
            if summary["has_adapter"]:
                names.append({"name": name, "objective": summary["objective"], "model": summary["model"]})
    return {"base": s.model, "adapters": names, "state": s.chat.state}


async def chat(body: ChatBody, request: Request):
    s = state_of(request)
    for m in body.models:
        if m != BASE:
            s.ws.run_dir(m)
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
        {"role": "user", "content": body.prompt}
    ]
    try:
        columns = await s.chat.columns(body.models, messages)
    except ValueError as err:
        raise UiError(503 if s.chat.load_error else 400, str(err)) from None
    if s.chat.context and len(columns[0].prompt_ids or []) + body.max_tokens > s.chat.context:
        raise UiError(400, f"prompt + max_tokens exceed the model's context of {s.chat.context} tokens")
    stream = s.chat.stream(columns, body.max_tokens, body.temperature, body.seed)
    return StreamingResponse(sse(stream, request), media_type="text/event-stream")


async def sse(events: AsyncIterator[dict[str, Any]], request: Request) -> AsyncIterator[str]:
    async for event in events:
        yield f"data: {json.dumps(event)}\n\n"
        if await request.is_disconnected():
            return
    yield "data: [DONE]\n\n"
