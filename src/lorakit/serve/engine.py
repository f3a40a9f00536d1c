"""Continuous-batching generation over one base model and many LoRA adapters.

One thread owns the model: the caller's own through ``run_here`` (``lorakit serve`` decodes on its main thread,
which loaded the model: on a CPU, small parallel products ran up to 1.6x slower from a second thread), or one
of its own through ``start`` (the dashboard, the tests). Each iteration it (1) runs queued commands (adapter
load/unload), (2) drops requests that were cancelled or ran out of time, (3) admits waiting requests up to the
batch limit and prefills them together in one forward, and (4) decodes one token for every running request in
one forward. Rows of a forward may use different adapters (``lorakit.route``; the stacked adapter tensors kept
across steps until the set of adapters changes). On a CPU, LLaMA-family models decode with the engine's own step
(``serve.step``: the same maths without transformers' per-module Python); other models, and adapters it does
not cover, with the model's forward (``decode_path`` says which and why). Prefills are the model's forward.

The KV cache is one left-padded batch in preallocated buffers (``serve.kv.SlotKV``), written in place: a decode
step writes one column for every row, joining requests their own rows; nothing is copied whole per step or join.
Text is detokenized incrementally (``serve.text.TextStream``). A step syncs with the device once, for the chosen
tokens. The engine knows nothing of HTTP: a request carries a ``sink`` callable that receives ``Event``s on the
engine thread (the API forwards them to its event loop).

Precision (``lorakit.precision``): the caller loads the base in the precision's storage dtype and the adapters in
its trained dtype (``lorakit serve`` does); every forward runs under the precision's autocast context (on a CPU
the routed adapters' tiny products stay float32, 3-4x faster there than bf16 ones); logits are upcast to float32
before sampling. ``lorakit serve --weights`` may store the base's linear layers as int8 (``lorakit.weights``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import route
from ..fastpath import trim_freed_memory
from ..models import kv_cache_inputs
from ..patches import FEW_ROWS, enable_skinny_linear, remove_patches
from ..precision import Precision
from ..state import has_adapters
from ..stopping import stop_token_ids
from .kv import SlotKV
from .step import DecodeStep
from .text import TextStream, first_stop, held_back

# Prefills are left-padded to a multiple of this many tokens. Every distinct (rows x tokens) shape makes the CPU
# GEMM library (oneDNN, under bf16) build and cache a kernel of its own: with one shape per prompt length the
# cache fills with hundreds of them, and the server's memory creeps up for minutes while the cost of building
# them slows every step.
PREFILL_LENGTH_STEP = 8
TRIM_EVERY_S = 2.0  # how often the engine returns freed heap pages to the OS on CPU (trim_freed_memory)
# A burst of requests reaching an idle engine is prefilled together: once the first has arrived the engine waits
# until no other has arrived for BURST_QUIET_S (at most BURST_MAX_S in all). Eight clients starting at once
# otherwise became two prefills, the first alone (1 + 7 rows: 0.33 s against 0.2 s for 8 on 2 CPU cores).
BURST_QUIET_S = 0.008
BURST_MAX_S = 0.04


class QueueFull(Exception):
    """The waiting queue is at its limit; the caller should answer 429."""


@dataclass
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` is greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past EOS (benchmarks that need exact lengths)


@dataclass
class Event:
    """Produced for a request: new text, and at the end a finish reason (or an error)."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", or None while running
    error: str | None = None  # set when the request failed or timed out
    error_status: int = 500
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Request:
    """One generation: prompt token ids, the adapter (None: base model), sampling, and where events go."""

    def __init__(
        self,
        prompt_ids: list[int],
        adapter: str | None,
        params: SamplingParams,
        sink: Callable[[Event], None],
        timeout_s: float | None = None,
    ) -> None:
        assert prompt_ids, "empty prompts are refused before they reach the engine"
        self.prompt_ids = list(prompt_ids)
        self.adapter = adapter
        self.params = params
        self.sink = sink
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self.generated: list[int] = []
        self.text = TextStream()  # the generated text, decoded a token at a time
        self.emitted = 0  # characters of text already sent
        self.sampled = 0  # tokens sampled so far, EOS included
        self.cancelled = False
        self.done = False
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def cancel(self) -> None:
        """Stop this request's work (thread-safe: the engine checks the flag between steps)."""
        self.cancelled = True


class Engine:
    """Continuous batching of generation requests across adapters, one forward per step.

    Args:
        model: a causal LM with lorakit adapters injected (or none), unmerged.
        tokenizer: its tokenizer (decodes the generated text, knows EOS).
        max_batch_size: most requests decoded together.
        max_queue: most requests waiting for a batch slot; ``submit`` raises ``QueueFull`` beyond it.
        few_row_fast_path: give the model's ``nn.Linear`` layers the few-rows CPU layout while the engine runs
            (``lorakit.patches.enable_skinny_linear``; shown in ``print(model)``, taken away by ``stop``);
            None: on for a model on the CPU.
        precision: the resolved precision whose autocast context every forward runs in (the model and its
            adapters already in its dtypes); None: no autocast, the model's own dtypes.
        fast_step: decode with the engine's own step (``serve.step``) where it covers the model; None: on a CPU
            (the default), False: always the model's forward, True: on any device.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        few_row_fast_path: bool | None = None,
        precision: Precision | None = None,
        fast_step: bool | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        param = next(model.parameters())
        self.device = param.device
        self.precision = precision
        self.pad_id = _pad_id(model, tokenizer)
        self.eos_ids = stop_token_ids(tokenizer, model)  # the one policy: evaluation's and export's too
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        if few_row_fast_path or (few_row_fast_path is None and self.device.type == "cpu"):
            enable_skinny_linear(model)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._commands: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._kv = SlotKV(max_batch_size)
        self._stacks: dict = {}
        self._fast_step = fast_step
        self._step: DecodeStep | bool | None = None  # None: not built yet; False: the model's forward decodes
        self.decode_path = "not decided yet (at the first decode step)"
        self.steps = 0
        self.generated_tokens = 0
        self._trimmed_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._here: threading.Event | None = None  # run_here's: set once its loop has ended
        self._here_thread: threading.Thread | None = None

    # ----- control, called from other threads ----------------------------------------------------------
    def start(self) -> Engine:
        """Start the engine thread (a second call does nothing; nor does a call while ``run_here`` runs the
        loop on its caller's thread)."""
        if not self._thread.is_alive() and self._here is None:
            self._thread.start()
        return self

    def run_here(self, until: Callable[[], bool] = lambda: False, poll_s: float = 0.5) -> None:
        """Run the engine's loop on the calling thread (instead of ``start``'s thread of its own) until ``stop``
        is called or ``until()`` is true (checked at least every ``poll_s`` seconds). ``lorakit serve`` decodes on
        its main thread this way: on a CPU, the thread that loaded the model runs its small parallel products
        faster than a second thread does (BENCHMARKS.md, serving)."""
        self.reserve_caller_thread()
        try:
            self._loop(until, poll_s)
        finally:
            self._here.set()

    def reserve_caller_thread(self) -> None:
        """From now on ``start`` does nothing: the loop is to run on the calling thread (``run_here``). Call it
        before anything that may call ``start`` (the app's lifespan, on the HTTP thread) can run."""
        if self._here is None:
            self._here, self._here_thread = threading.Event(), threading.current_thread()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._here is not None and threading.current_thread() is not self._here_thread:
            self._here.wait(timeout=30)  # the loop on run_here's thread finishes its step first
        remove_patches(self.model, FEW_ROWS)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, request: Request) -> None:
        """Queue a request. Raises ``QueueFull`` when ``max_queue`` requests already wait."""
        with self._cv:
            if self._stop:
                raise RuntimeError("the engine has stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (limit {self.max_queue})")
            self._waiting.append(request)
            self._cv.notify_all()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two steps (to change the model's adapters safely)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._commands.append((fn, future))
            self._cv.notify_all()
        return future

    def adapters_in_use(self) -> set[str | None]:
        with self._cv:
            waiting = list(self._waiting)
        return {r.adapter for r in list(self._running) + waiting}

    def invalidate_adapters(self) -> None:
        """Forget the stacked adapter tensors (engine thread only: after adapters change)."""
        self._stacks.clear()
        self._step = None  # rebuilt at the next decode: the adapters' layers may have changed

    def decode_step(self) -> DecodeStep | None:
        """The engine's own decode step (``serve.step``), built at the first call after the model or its
        adapters changed; None where the model's forward decodes (``decode_path`` says why)."""
        if self._step is None:
            step, self.decode_path = DecodeStep.build(self.model, self._fast_step)
            self._step = step or False
        return self._step or None

    # ----- the loop ----------------------------------------------------------------------------------------
    def _loop(self, until: Callable[[], bool] = lambda: False, poll_s: float | None = None) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._waiting or self._running or self._commands or until()):
                    self._cv.wait(timeout=poll_s)
                if self._stop or until():
                    break
                commands = list(self._commands)
                self._commands.clear()
            for fn, future in commands:
                self._run_command(fn, future)
            self._reap()
            joiners = self._admit()
            try:
                with torch.inference_mode():
                    if joiners:
                        self._prefill(joiners)
                    if self._running:
                        self._decode()
            except Exception as err:  # keep serving: fail the batch in flight (and the joiners), not the server
                self._fail_all(f"generation failed: {type(err).__name__}: {err}", joiners=joiners)
            self._trim_now_and_then()
        self._fail_all("the server is shutting down", status=503, include_waiting=True)

    def _trim_now_and_then(self) -> None:
        """Return the heaps' free pages to the OS every TRIM_EVERY_S seconds of serving (CPU: see
        ``fastpath.trim_freed_memory``), so RSS follows the working set instead of creeping up under load."""
        now = time.monotonic()
        if self.device.type == "cpu" and now - self._trimmed_at >= TRIM_EVERY_S:
            trim_freed_memory()
            self._trimmed_at = now

    def _run_command(self, fn, future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as err:
            future.set_exception(err)

    def _admit(self) -> list[Request]:
        joiners: list[Request] = []
        with self._cv:
            if not self._running and self._waiting:
                self._gather_burst()
            while self._waiting and len(self._running) + len(joiners) < self.max_batch_size:
                joiners.append(self._waiting.popleft())
        return joiners

    def _gather_burst(self) -> None:
        """(Holding ``_cv``, the engine idle, a request waiting) wait while more requests keep arriving (see
        BURST_QUIET_S), so that a burst is prefilled in one forward."""
        deadline = time.monotonic() + BURST_MAX_S
        seen = len(self._waiting)
        while seen < self.max_batch_size and not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(timeout=min(BURST_QUIET_S, left))
            if len(self._waiting) == seen:
                return  # quiet: no request arrived in BURST_QUIET_S
            seen = len(self._waiting)

    def _reap(self) -> None:
        """Drop cancelled requests and fail timed-out ones, waiting or running."""
        now = time.monotonic()
        with self._cv:
            waiting = list(self._waiting)
        for req in waiting + self._running:
            if req.cancelled:
                req.done = True
            elif req.deadline is not None and now > req.deadline:
                self._finish_error(req, "the request timed out before it finished; raise the server's --timeout", 408)
        with self._cv:
            self._waiting = deque(r for r in self._waiting if not r.done)
        self._drop_done()

    # ----- forwards ----------------------------------------------------------------------------------------
    def _forward(self, ids, mask, positions, cache, adapters: list[str | None]) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        inputs.update(kv_cache_inputs(self.model, cache))
        with self._autocast():
            if has_adapters(self.model):  # always route: rows without an adapter must not see the active one
                with route(self.model, adapters, stacks=self._stacks):
                    out = self.model(**inputs, **kwargs)
            else:
                out = self.model(**inputs, **kwargs)
        self.steps += 1
        return out.logits[:, -1, :].float()

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The precision's autocast context (entered on the engine thread: autocast is per thread)."""
        return self.precision.context(self.device) if self.precision is not None else contextlib.nullcontext()

    def _prefill(self, joiners: list[Request]) -> None:
        from transformers import DynamicCache

        longest = max(len(r.prompt_ids) for r in joiners)
        length = -(-longest // PREFILL_LENGTH_STEP) * PREFILL_LENGTH_STEP  # a few shapes, not one per prompt
        ids = torch.full((len(joiners), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(joiners), length), dtype=torch.long)
        for i, req in enumerate(joiners):
            ids[i, length - len(req.prompt_ids) :] = torch.tensor(req.prompt_ids)
            mask[i, length - len(req.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in joiners])
        self._kv.add([(layer.keys, layer.values) for layer in cache.layers], mask)
        self._running.extend(joiners)
        self._emit_tokens(joiners, logits)

    def _decode(self) -> None:
        rows = self._running
        ids = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long).to(self.device, non_blocking=True)
        positions = torch.tensor([[len(r.prompt_ids) + r.sampled - 1] for r in rows], dtype=torch.long)
        positions = positions.to(self.device, non_blocking=True)
        adapters = [r.adapter for r in rows]
        logits = None
        step = self.decode_step()
        if step is not None:
            self._kv.prepare_step()
            autocast = self.precision.autocast if self.precision is not None else None
            logits = step(ids.view(-1), positions.view(-1), self._kv, adapters, autocast)
            if logits is not None:
                self.steps += 1
        if logits is None:
            cache = self._kv.step_cache()
            logits = self._forward(ids, self._kv.attention_mask(extra=1), positions, cache, adapters)
        self._kv.advance()
        self._emit_tokens(rows, logits)

    def _emit_tokens(self, rows: list[Request], logits: torch.Tensor) -> None:
        tokens = self._choose(rows, logits)
        for req, token in zip(rows, tokens, strict=True):
            if not req.done:
                self._accept(req, token)
        self._drop_done()

    def _drop_done(self) -> None:
        if not any(r.done for r in self._running):
            return
        keep = [i for i, r in enumerate(self._running) if not r.done]
        self._running = [self._running[i] for i in keep]
        self._kv.keep(keep)

    # ----- sampling and text -------------------------------------------------------------------------------
    def _choose(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        """Each row's next token: greedy, or sampled with the request's own generator. One transfer from the
        device: the greedy choices alone, or with sampling rows the logits (sampled on the host)."""
        if not any(req.params.temperature > 0 for req in rows):
            return logits.argmax(dim=-1).tolist()
        logits = logits.cpu()
        tokens = logits.argmax(dim=-1).tolist()
        for i, req in enumerate(rows):
            if req.params.temperature > 0:
                tokens[i] = _sample(logits[i], req.params.temperature, req.params.top_p, req.generator)
        return tokens

    def _accept(self, req: Request, token: int) -> None:
        req.sampled += 1
        self.generated_tokens += 1
        if token in self.eos_ids and not req.params.ignore_eos:
            self._finish(req, req.text.text, "stop")
            return
        req.generated.append(token)
        text = req.text.add(self.tokenizer, req.generated)
        cut = first_stop(text, req.params.stop, max(0, req.emitted - max((len(s) for s in req.params.stop), default=0)))
        if cut is not None:
            self._finish(req, text[:cut], "stop")
        elif len(req.generated) >= req.params.max_tokens:
            self._finish(req, text, "length")
        else:
            safe = len(text) - held_back(text, req.params.stop)
            if safe > req.emitted:
                req.sink(Event(text=text[req.emitted : safe]))
                req.emitted = safe

    def _finish(self, req: Request, text: str, reason: str) -> None:
        req.done = True
        tail = text[req.emitted :]
        req.emitted = max(req.emitted, len(text))
        req.sink(
            Event(
                text=tail,
                finish_reason=reason,
                prompt_tokens=len(req.prompt_ids),
                completion_tokens=req.sampled,  # EOS included
            )
        )

    def _finish_error(self, req: Request, message: str, status: int) -> None:
        req.done = True
        req.sink(Event(error=message, error_status=status, prompt_tokens=len(req.prompt_ids)))

    def fail_all(self, message: str) -> None:
        """Answer every running and waiting request with ``message`` (HTTP 503), while the loop is not running
        (``lorakit serve`` on Ctrl-C)."""
        self._fail_all(message, status=503, include_waiting=True)

    def _fail_all(
        self, message: str, status: int = 500, include_waiting: bool = False, joiners: list[Request] = ()
    ) -> None:
        victims = list(self._running) + [r for r in joiners if r not in self._running]
        if include_waiting:
            with self._cv:
                victims += list(self._waiting)
                self._waiting.clear()
        for req in victims:
            if not req.done:
                self._finish_error(req, message, status)
        self._running = []
        self._kv.clear()


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """A token drawn from one row's logits (on the host, as the request's generator is)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest set whose mass reaches top_p
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def _pad_id(model: nn.Module, tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, getattr(model.config, "pad_token_id", None), tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
