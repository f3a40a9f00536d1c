"""The adapters a server hosts: loaded at start from NAME=DIR, and at run time by name from --adapter-dir.

Run-time loading takes a name and an optional path *relative to* the adapter directory, never an absolute
path: ``..`` components are refused and the resolved path (symlinks followed) must stay inside the
directory, so a client cannot make the server read files elsewhere. All changes to the model happen on
the engine thread between two steps; an adapter being unloaded stops taking new requests at once and is
removed when the requests already using it have finished.

Every adapter is loaded in one dtype, ``adapter_dtype`` (see ``lorakit.load_adapter``; None: float32 over a
bf16 / float16 base, else the base's): ``lorakit serve`` passes its precision's trained dtype, float32 under
bf16-mixed, bf16 under bf16.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path, PurePosixPath

from torch import nn

from ..adapters import delete_adapter
from ..io import load_adapter
from ..layers import AdapterDtype
from ..state import has_adapters
from ..state import registry as model_registry
from .engine import Engine

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterError(Exception):
    """A refused adapter operation: ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AdapterRegistry:
    def __init__(
        self,
        model: nn.Module,
        engine: Engine,
        base_name: str,
        adapter_dir: str | Path | None = None,
        *,
        adapter_dtype: AdapterDtype = None,
    ):
        self.model = model
        self.engine = engine
        self.base_name = base_name
        self.adapter_dtype = adapter_dtype
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        if self.adapter_dir is not None and not self.adapter_dir.is_dir():
            raise ValueError(f"--adapter-dir {adapter_dir} is not a directory; create it or fix the path")
        self._names: dict[str, str] = {}  # name -> where it was loaded from (for /v1/models)
        self._lock = threading.Lock()

    # ----- lookups ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def source(self, name: str) -> str:
        return self._names.get(name, "")

    def resolve_model(self, model: str) -> str | None:
        """The adapter a request's ``model`` field selects (None: the base model)."""
        if model == self.base_name:
            return None
        with self._lock:
            if model in self._names:
                return model
        known = ", ".join([self.base_name, *self.names()])
        raise AdapterError(
            f"The model '{model}' does not exist. Use the base model or one of the adapters: {known} "
            "(GET /v1/models lists them).",
            status=404,
            code="model_not_found",
        )

    # ----- changes ---------------------------------------------------------------------------------------------
    def load_at_start(self, name: str, directory: str | Path) -> None:
        """Load before the engine runs (from the command line: any path the operator gives)."""
        self._check_name(name)
        load_adapter(self.model, directory, name, adapter_dtype=self.adapter_dtype)
        self._names[name] = str(directory)

    async def load(self, name: str, path: str | None = None) -> str:
        """Load ``adapter_dir/path`` (default ``adapter_dir/name``) as adapter ``name``."""
        self._check_name(name)
        directory = self.safe_path(path if path is not None else name)

        def work():
            load_adapter(self.model, directory, name, adapter_dtype=self.adapter_dtype)
            self.engine.invalidate_adapters()

        try:
            await asyncio.wrap_future(self.engine.call(work))
        except (ValueError, TypeError, OSError) as err:
            raise AdapterError(f"could not load adapter '{name}' from {path or name}: {err}") from err
        with self._lock:
            self._names[name] = str(directory.relative_to(self.adapter_dir))
        return name

    async def unload(self, name: str, wait_s: float = 600.0) -> None:
        """Stop routing new requests to ``name`` now; remove it once its running requests finish."""
        with self._lock:
            if name not in self._names:
                raise AdapterError(f"no adapter named '{name}' is loaded", status=404, code="adapter_not_found")
            del self._names[name]

        def try_delete() -> bool:
            if name in self.engine.adapters_in_use():
                return False
            delete_adapter(self.model, name)
            self.engine.invalidate_adapters()
            return True

        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not await asyncio.wrap_future(self.engine.call(try_delete)):
            if loop.time() > deadline:
                raise AdapterError(f"adapter '{name}' is still in use after {wait_s:.0f} s", status=409)
            await asyncio.sleep(0.05)

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise AdapterError(
                f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                "or digit"
            )
        if name == self.base_name:
            raise AdapterError(f"'{name}' is the base model's name; choose another adapter name")
        with self._lock:
            taken = name in self._names
        if taken or (has_adapters(self.model) and name in model_registry(self.model).adapters):
            raise AdapterError(f"an adapter named '{name}' is already loaded; unload it first", status=409)

    def safe_path(self, path: str) -> Path:
        """``adapter_dir/path`` after refusing absolute paths, ``..`` and symlinks that lead outside."""
        if self.adapter_dir is None:
            raise AdapterError("loading adapters at run time needs the server started with --adapter-dir DIR")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise AdapterError(f"invalid adapter path {path!r}: give a directory name inside the adapter directory")
        pure = PurePosixPath(path.replace("\\", "/"))
        if pure.is_absolute() or Path(path).is_absolute() or re.match(r"^[A-Za-z]:", path):
            raise AdapterError(
                f"absolute adapter paths are refused ({path!r}); give a name inside the adapter directory"
            )
        if ".." in pure.parts:
            raise AdapterError(f"'..' is refused in adapter paths ({path!r}); give a name inside the adapter directory")
        resolved = (self.adapter_dir / pure).resolve()
        if not resolved.is_relative_to(self.adapter_dir):
            raise AdapterError(
                f"adapter path {path!r} leads outside the adapter directory (through a symlink); refused"
            )
        if not (resolved / "adapter_config.json").is_file():
            raise AdapterError(
                f"no adapter at {path!r} in the adapter directory (no adapter_config.json)",
                status=404,
                code="adapter_not_found",
            )
        return resolved
