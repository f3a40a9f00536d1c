"""The dashboard's chat: one prompt answered side by side by the base model and any runs' adapters.

The base model loads on the first chat (in a thread, so the page stays live), into the serving engine
(``lorakit.serve.engine``): every column is one engine request and the engine decodes them together,
each row through its own adapter (``lorakit.route``), in one forward per token. Adapters load from the
runs directory through the serving registry (paths confined to it); a run retrained since it was loaded
is loaded again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import chat_prompt_ids
from ..models import is_embedded, load_model
from ..serve.engine import Engine, Event, QueueFull, SamplingParams
from ..serve.engine import Request as EngineRequest
from ..serve.registry import AdapterError, AdapterRegistry
from .runs import Workspace, read_yaml

BASE = "base"
MAX_COLUMNS = 8
MAX_TOKENS = 1024


@dataclass
class ChatColumn:
    model: str  # "base" or a run name
    adapter: str | None = None  # the engine's name of the run's adapter
    prompt_ids: list[int] | None = None
    error: str | None = None


class ChatService:
    def __init__(self, ws: Workspace, model: str, timeout_s: float = 300.0) -> None:
        self.ws = ws
        self.model_spec = model
        self.timeout_s = timeout_s
        self.engine: Engine | None = None
        self.registry: AdapterRegistry | None = None
        self.tokenizer: Any = None
        self.context: int | None = None
        self.load_error: str | None = None
        self._start_lock = asyncio.Lock()
        self._adapter_lock = asyncio.Lock()
        self._loaded: dict[str, tuple[str, float]] = {}  # run name -> (engine adapter name, file mtime)

    @property
    def state(self) -> str:
        return "ready" if self.engine is not None else ("failed" if self.load_error else "not loaded")

    async def start(self) -> None:
        async with self._start_lock:
            if self.engine is None:
                await asyncio.to_thread(self._load)

    def _load(self) -> None:
        try:
            model, tokenizer = load_model(self.model_spec, dtype=torch.float32)
        except (ValueError, OSError) as err:
            self.load_error = f"could not load the model {self.model_spec}: {err}"
            raise ValueError(self.load_error) from None
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            self.load_error = f"the model {self.model_spec} has no tokenizer with a chat template; chat needs one"
            raise ValueError(self.load_error)
        if torch.cuda.is_available():
            model.to("cuda")
        self.tokenizer = tokenizer
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.engine = Engine(model, tokenizer).start()
        self.registry = AdapterRegistry(model, self.engine, BASE, self.ws.root)
        self.load_error = None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # ----- adapters -----------------------------------------------------------------------------------------
    def same_model(self, run_dir: Path) -> str | None:
        """Why the run's adapter does not belong on the dashboard's model (None: it does, or cannot tell)."""
        config = read_yaml(run_dir / "config.yaml")
        trained_on = config.get("model") if isinstance(config, dict) else None
        if trained_on is None:
            return None
        embedded = is_embedded(trained_on), is_embedded(self.model_spec)
        if trained_on == self.model_spec or all(embedded):
            return None
        if any(embedded):
            return f"trained on model {trained_on!r}; the dashboard chats with {self.model_spec!r}"
        mine = Path(self.model_spec).resolve()
        theirs = (self.ws.root / trained_on).resolve()
        return None if mine == theirs else f"trained on model {trained_on}; the dashboard chats with {mine}"

    async def adapter(self, name: str) -> str:
        """The engine's name of run ``name``'s adapter, loading (or reloading) it when needed."""
        d = self.ws.run_dir(name)
        weights = d / "adapter_model.safetensors"
        if not (weights.is_file() and (d / "adapter_config.json").is_file()):
            raise AdapterError(f"run {name!r} has no adapter yet (it writes one when it finishes)", status=404)
        reason = self.same_model(d)
        if reason:
            raise AdapterError(f"run {name!r} was {reason}", status=409)
        mtime = weights.stat().st_mtime
        alias = "run-" + hashlib.sha1(name.encode()).hexdigest()[:12]
        async with self._adapter_lock:
            loaded = self._loaded.get(name)
            if loaded is not None and loaded[1] == mtime:
                return loaded[0]
            assert self.registry is not None
            if loaded is not None:
                await self.registry.unload(alias)
                del self._loaded[name]
            await self.registry.load(alias, self.ws.relative(d))
            self._loaded[name] = (alias, mtime)
        return alias

    # ----- generation ---------------------------------------------------------------------------------------
    async def columns(self, models: list[str], messages: list[dict[str, str]]) -> list[ChatColumn]:
        await self.start()
        ids = chat_prompt_ids(self.tokenizer, messages)
        columns = []
        for model in models:
            column = ChatColumn(model, prompt_ids=ids)
            if model != BASE:
                try:
                    column.adapter = await self.adapter(model)
                except (AdapterError, ValueError) as err:
                    column.error = str(err)
            columns.append(column)
        return columns

    async def stream(
        self, columns: list[ChatColumn], max_tokens: int, temperature: float, seed: int | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Events {"index", "text"} as tokens arrive, {"index", "finish_reason", "completion_tokens"} at the end
        of each column and {"index", "error"} for a column that failed."""
        assert self.engine is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        requests: list[EngineRequest] = []
        pending = 0
        for index, column in enumerate(columns):
            if column.error:
                yield {"index": index, "error": column.error}
                continue
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)

            def sink(event: Event, index=index) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))

            request = EngineRequest(column.prompt_ids or [], column.adapter, params, sink, timeout_s=self.timeout_s)
            try:
                self.engine.submit(request)
            except QueueFull as err:
                yield {"index": index, "error": f"the engine is busy: {err}; try again"}
                continue
            requests.append(request)
            pending += 1
        try:
            while pending:
                index, event = await queue.get()
                if event.text:
                    yield {"index": index, "text": event.text}
                if event.error:
                    pending -= 1
                    yield {"index": index, "error": event.error}
                elif event.finish_reason:
                    pending -= 1
                    yield {"index": index, "finish_reason": event.finish_reason,
                           "completion_tokens": event.completion_tokens}  # fmt: skip
        finally:
            for request in requests:
                request.cancel()
