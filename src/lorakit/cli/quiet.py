"""What a command prints besides its own output: lorakit's warnings as one plain line, library noise not at all.

``main()`` runs every command inside ``quieted()``; the library itself never changes how a program shows
warnings or logs (``_bnb`` drops one bitsandbytes record while it imports bitsandbytes, and says why). The
rule, decided by where a warning comes from (the module whose code called ``warnings.warn``, or the logger a
record was logged to) and by its category:

- lorakit's own warnings (raised by code in the ``lorakit`` package, any category) print as one line,
  ``lorakit: warning: <message>``: no file:line, no source line.
- A library's deprecation (DeprecationWarning, PendingDeprecationWarning, FutureWarning, or a message that
  says "deprecated") is not shown: it asks the authors of the code that calls the library, lorakit's, to
  change it; the user can do nothing about it.
- Any other library warning may be about the user's data, model or numbers, and prints as one line,
  ``lorakit: warning (<library>): <message>``.
- transformers' and huggingface_hub's logging show errors only (``set_verbosity_error``; unless
  TRANSFORMERS_VERBOSITY or HF_HUB_VERBOSITY says otherwise). Other libraries' log records of level WARNING
  and above, which Python prints bare (``logging.lastResort``) when the program configured no logging, print
  as ``lorakit: warning (<library>): <message>`` (``error`` from level ERROR), deprecations not at all.
  bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" is dropped (see ``_bnb``).
- Library progress bars (transformers, huggingface_hub) show only when stderr is a terminal: in a log file
  each bar is one long line of every update.
- Each distinct line prints once per command.

LORAKIT_VERBOSE=1 leaves all of it as Python and the libraries have it (file:line, source line, every
deprecation, every log record). Everything is put back when the command returns, so a program that calls
``main()`` keeps its own settings; while the command runs, though, its warnings are printed rather than
recorded by a ``warnings.catch_warnings(record=True)`` (``pytest.warns``) around ``main()``: record them
around the library call instead, or set LORAKIT_VERBOSE=1.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import FrameType
from typing import TypeVar

from .. import _bnb

VERBOSE_ENV = "LORAKIT_VERBOSE"
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_DEPRECATED = re.compile(r"\bdeprecat", re.IGNORECASE)
_SKIPPED_FILES = {warnings.__file__, __file__}
T = TypeVar("T")


def call(function: Callable[..., T], *args) -> T:
    """``function(*args)`` with the noise rules of the module docstring (unless LORAKIT_VERBOSE=1)."""
    with quieted():
        return function(*args)


def verbose() -> bool:
    """LORAKIT_VERBOSE set to anything but empty, 0, false or no."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def quieted() -> Iterator[None]:
    """Warnings, library logging and library progress bars as the module docstring says, until exit."""
    if verbose():
        yield
        return
    printer = _Printer()
    with ExitStack() as stack:
        stack.enter_context(_warnings_shown_by(printer))
        stack.enter_context(_last_resort(_OneLineHandler(printer)))
        stack.enter_context(_library_logging_errors_only())
        stack.enter_context(_bnb.kernels_hub_message_dropped())
        stack.enter_context(_library_bars_on_terminal_only())
        yield


def warning_line(origin: str, message: str, deprecation: bool = False) -> str | None:
    """The line for a warning from module or logger ``origin``, or None when it stays quiet."""
    text = " ".join(message.split())
    if _is_lorakit(origin):
        return f"lorakit: warning: {text}"
    if deprecation or _DEPRECATED.search(text):
        return None
    return f"lorakit: warning ({_library(origin)}): {text}"


class _Printer:
    """Prints each distinct line once, to the current sys.stderr."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def line(self, text: str | None) -> None:
        if text is None or text in self.seen:
            return
        self.seen.add(text)
        print(text, file=sys.stderr, flush=True)


@contextmanager
def _warnings_shown_by(printer: _Printer) -> Iterator[None]:
    """Route the warnings that pass Python's filters to ``printer`` (filters and -W error stay as they are)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        origin = _raising_module(sys._getframe(1))
        printer.line(warning_line(origin, str(message), issubclass(category, _DEPRECATIONS)))

    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


def _raising_module(frame: FrameType | None) -> str:
    """The module whose code called ``warnings.warn``: the first frame outside the warnings machinery.

    Not the module the warning is attributed to (``stacklevel``), which is often the caller's: transformers'
    deprecations point at the code that used the old name. A warning that a compiled extension (torch's C++)
    raises has no frame of its own and counts as the module of the Python line that called it.
    """
    while frame is not None and frame.f_code.co_filename in _SKIPPED_FILES:
        frame = frame.f_back
    if frame is None:
        return ""
    spec = frame.f_globals.get("__spec__")
    return getattr(spec, "name", None) or frame.f_globals.get("__name__", "")


class _OneLineHandler(logging.Handler):
    """Log records of level WARNING and above as one ``lorakit: warning (<library>): ...`` line."""

    def __init__(self, printer: _Printer) -> None:
        super().__init__(logging.WARNING)
        self.printer = printer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = warning_line(record.name, record.getMessage())
        except Exception:
            self.handleError(record)
            return
        if line is not None and record.levelno >= logging.ERROR:
            line = line.replace("lorakit: warning", "lorakit: error", 1)
        self.printer.line(line)


@contextmanager
def _last_resort(handler: logging.Handler) -> Iterator[None]:
    """``handler`` for records no configured handler takes (Python prints those bare to stderr)."""
    saved = logging.lastResort
    logging.lastResort = handler
    try:
        yield
    finally:
        logging.lastResort = saved


@contextmanager
def _library_logging_errors_only() -> Iterator[None]:
    """transformers' and huggingface_hub's loggers at ERROR, unless their verbosity variable is set."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    libraries = {
        "transformers": (hf_logging, "TRANSFORMERS_VERBOSITY"),
        "huggingface_hub": (hub_logging, "HF_HUB_VERBOSITY"),
    }
    saved = [(lib, logging.getLogger(name).level) for name, (lib, env) in libraries.items() if not os.environ.get(env)]
    for lib, _ in saved:
        lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib, level in saved:
            lib.set_verbosity(level)


@contextmanager
def _library_bars_on_terminal_only() -> Iterator[None]:
    """No transformers / huggingface_hub progress bars while stderr is not a terminal."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    on = hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    if not on or sys.stderr.isatty():
        yield
        return
    hf_logging.disable_progress_bar()  # both libraries' bars
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _is_lorakit(origin: str) -> bool:
    return origin == "lorakit" or origin.startswith("lorakit.")


def _library(origin: str) -> str:
    return origin.split(".")[0] or "python"
