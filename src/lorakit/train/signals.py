"""Stop requests for a training run: SIGINT (Ctrl-C) and SIGTERM (``timeout``, Slurm, Kubernetes) alike.

Both signals end a run the same way: the newest state is checkpointed, ``status.json`` says ``interrupted``,
and ``--resume`` continues exactly. During an optimizer step the signal only raises a flag: the step finishes
and the run stops at its boundary, where the weights, the optimizer and the step counter agree. Under torchrun
the flag travels with the step's own all-reduce, so every process stops after the same step even when only
some of them were signalled. Outside the steps (loading, evaluating) the signal stops the run at once. A second
signal while a stop is pending stops at once too. Once the run has ended (stopped, failed or finished),
signals are ignored until its ``status.json`` is written.

SIGINT is installed explicitly: a run started in the background from a shell script inherits SIGINT ignored
(the shell sets SIG_IGN for background jobs), and would otherwise not stop on ``kill -INT``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report them


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by ``signum`` (a KeyboardInterrupt, so Ctrl-C's handling applies to both)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)


class StopRequests:
    """The signals received since ``install``; inside ``deferred()`` they wait for the step's end."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received by this process
        self.agreed: int | None = None  # the signal some process received, as the processes agreed on it
        self._deferring = False
        self._ignoring = False

    @property
    def pending(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame) -> None:
        if self._ignoring:
            return
        if self._deferring and self.signum is None:
            self.signum = signum  # the step ends first; the loop stops at its boundary
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block (one optimizer step) that a signal does not cut short."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def ignore(self) -> None:
        """From now on signals change nothing: the run has ended and is writing how it ended."""
        self._ignoring = True

    def as_counts(self) -> list[float]:
        """One slot per handled signal, 1 for the one received: summed over the processes by the step's
        all-reduce, then read back by ``agree``."""
        return [float(self.signum == s) for s in HANDLED]

    def agree(self, counts: list[float]) -> None:
        """The summed ``as_counts`` of every process: a stop at this step's end if any process was signalled
        (SIGTERM named where both signals came)."""
        received = [s for s, n in zip(HANDLED, counts, strict=True) if n > 0]
        self.agreed = received[-1] if received else None

    def stop(self) -> None:
        """Raise the stop request (at a step boundary)."""
        signum = self.agreed or self.signum
        assert signum is not None
        raise Interrupted(signum)


@contextlib.contextmanager
def installed() -> Iterator[StopRequests]:
    """Handle SIGINT and SIGTERM for the block, then restore the handlers that were there. Outside the main
    thread (where Python cannot set handlers) the requests object is inert and the process keeps its own."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {s: signal.signal(s, requests.handle) for s in HANDLED}
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
