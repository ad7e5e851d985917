"""Continuous batching: requests join and leave a running decode batch between steps.

One thread owns the model. Each loop it (1) drops cancelled requests, (2) admits waiting
requests while the memory budget allows, (3) prefills admitted prompts, at most
``prefill_chunk_tokens`` tokens per loop so that a long prompt does not stall the others (a
prompt done: first token, join the batch), and (4) advances every running request by one token
in one batched step. Every request's cache has a size known before it runs (a fixed-size state
for power retention), so admission is a sum against a budget, and a request never has to be
evicted half-way.

Results go back through a callback per request, called on the engine thread; the HTTP layer
hands them to its event loop.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .backends import Backend
from .sampling import SamplingParams, sample_token
from .tokens import IncrementalDecoder, TextTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """A piece of a request's output: new text, the token behind it, and the end when it comes.

    ``finish_reason`` is None while generating, then ``"stop"`` (end of text or a stop string),
    ``"length"`` (max_new_tokens), ``"cancelled"`` or ``"error"`` (``error`` says why).
    """

    text: str
    token: int | None = None
    logprob: float | None = None
    finish_reason: str | None = None
    error: str | None = None


class Sequence:
    """The output side of one request: tokens to text, stop strings, when to stop.

    Text that could be the beginning of a stop string is held back until it is clear it is not;
    the stop string itself is never emitted.
    """

    def __init__(self, tokenizer: TextTokenizer, params: SamplingParams,
                 eos_token_ids: frozenset[int]) -> None:
        self.params = params
        self.eos_token_ids = eos_token_ids | {tokenizer.eos_token_id}
        self.decoder = IncrementalDecoder(tokenizer)
        self.tokens: list[int] = []
        self.held = ""                 # decoded text not emitted yet (a possible stop prefix)
        self.finish_reason: str | None = None

    def accept(self, token: int, logprob: float) -> Event:
        """Record a sampled token; return what to emit (with the finish reason when done)."""
        self.tokens.append(token)
        if token in self.eos_token_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return Event(self.held + self.decoder.flush(), token, logprob, "stop")
        text = self.held + self.decoder.push(token)
        if len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            text += self.decoder.flush()
        stops = [text.find(s) for s in self.params.stop if s in text]
        if stops:
            self.finish_reason, self.held = "stop", ""
            return Event(text[:min(stops)], token, logprob, "stop")
        if self.finish_reason is None:
            keep = self._stop_prefix_length(text)
            text, self.held = text[:len(text) - keep], text[len(text) - keep:]
        return Event(text, token, logprob, self.finish_reason)

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for stop in self.params.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[len(text) - n:]):
                    best = n
                    break
        return best


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """A request as the engine tracks it; ``on_event`` receives its :class:`Event` s."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    reserved_bytes: int = 0
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    sequence: Sequence | None = None
    generator: object = None
    cache: object = None                     # while prefilling: the cache of the prompt so far
    prefilled: int = 0                       # prompt tokens prefilled so far

    @property
    def position(self) -> int:
        """Position of the token the next step feeds (the last one sampled)."""
        return len(self.prompt_ids) + len(self.sequence.tokens) - 1


class EngineFull(Exception):
    """Too many requests are running or waiting (HTTP 429)."""


class RequestTooLarge(Exception):
    """The request's cache alone would exceed the memory budget (HTTP 400)."""


@dataclass(frozen=True)
class EngineLimits:
    """Admission limits.

    ``memory_budget_bytes`` caps the sum of the cache bytes of the running requests (each
    request reserves ``backend.sequence_bytes(prompt, max_new_tokens)`` while it runs);
    ``max_batch_size`` caps how many run (or prefill) at once; ``max_concurrent_requests`` caps
    running plus waiting, beyond which :meth:`Engine.submit` raises :class:`EngineFull`;
    ``prefill_chunk_tokens`` is the most prompt tokens prefilled between two decode steps.
    """

    memory_budget_bytes: int = 2 << 30
    max_batch_size: int = 64
    max_concurrent_requests: int = 128
    prefill_chunk_tokens: int = 4096


class Engine:
    """The decode loop on its own thread; :meth:`submit` and :meth:`cancel` are thread-safe."""

    def __init__(self, backend: Backend, tokenizer: TextTokenizer,
                 limits: EngineLimits | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.limits = limits or EngineLimits()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []    # admitted, prompt not fully prefilled yet
        self._running: list[Request] = []       # in the order of the backend's batch rows
        self._batch = None
        self._reserved = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0                           # decode steps run (for tests and /health)
        self.largest_batch = 0
        self.cancelled = 0                       # requests ended by cancel()

    # -- public, any thread --------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="decode-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[Event], None]) -> Request:
        """Queue a request; raises :class:`EngineFull` or :class:`RequestTooLarge`."""
        need = self.backend.sequence_bytes(len(prompt_ids), params.max_new_tokens)
        if need > self.limits.memory_budget_bytes:
            raise RequestTooLarge(
                f"this request needs {need:,} bytes of cache, more than the server's memory "
                f"budget of {self.limits.memory_budget_bytes:,} bytes")
        request = Request(list(prompt_ids), params, on_event, reserved_bytes=need)
        with self._cond:
            if self._stopping:
                raise EngineFull("the server is shutting down")
            held = len(self._waiting) + len(self._prefilling) + len(self._running)
            if held >= self.limits.max_concurrent_requests:
                raise EngineFull(f"the server is busy: {self.limits.max_concurrent_requests} "
                                 "requests are running or waiting; retry later")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away); its slot is freed before the next step."""
        with self._cond:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                self.cancelled += 1
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {"running": len(self._running) + len(self._prefilling),
                    "prefilling": len(self._prefilling), "waiting": len(self._waiting),
                    "reserved_bytes": self._reserved,
                    "memory_budget_bytes": self.limits.memory_budget_bytes,
                    "max_batch_size": self.limits.max_batch_size,
                    "max_concurrent_requests": self.limits.max_concurrent_requests,
                    "decode_steps": self.steps, "largest_batch": self.largest_batch,
                    "cancelled": self.cancelled}

    # -- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._prefilling
                           or self._running):
                    self._cond.wait()
                if self._stopping:
                    break
                self._prefilling += self._take_admissible()
            try:
                self._drop_cancelled()
                self._prefill()
                if self._running:
                    self._step()
            except Exception as error:     # a bug or a device error: end what runs, go on
                log.exception("engine loop failed; ending the running requests")
                self._fail_all([*self._running, *self._prefilling], str(error))
        self._fail_all([*self._running, *self._prefilling, *self._waiting], "server shut down")

    def _fail_all(self, requests: list[Request], reason: str) -> None:
        for request in requests:
            if request not in self._waiting:
                self._release(request)
            self._finish(request, Event("", finish_reason="error", error=reason))
        self._batch = None
        with self._cond:
            self._running, self._prefilling = [], []
            self._waiting = deque(r for r in self._waiting if r not in requests)

    def _take_admissible(self) -> list[Request]:
        """Waiting requests that fit the budget now, first come first served (lock held)."""
        admitted = []
        while self._waiting:
            request = self._waiting[0]
            held = len(self._running) + len(self._prefilling) + len(admitted)
            if held >= self.limits.max_batch_size:
                break
            if self._reserved + request.reserved_bytes > self.limits.memory_budget_bytes:
                break
            self._waiting.popleft()
            self._reserved += request.reserved_bytes
            admitted.append(request)
        return admitted

    def _release(self, request: Request) -> None:
        with self._cond:
            self._reserved -= request.reserved_bytes

    def _finish(self, request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:       # a consumer that fails must not stop the engine
            log.exception("request %d: delivering its last event failed", request.id)

    def _emit(self, request: Request, event: Event) -> None:
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        try:
            request.on_event(event)
        except Exception:
            log.exception("request %d: delivering an event failed; cancelling it", request.id)
            request.cancelled = True

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._prefilling if r.cancelled]:
            self._release(request)
            self.cancelled += 1
            self._finish(request, Event("", finish_reason="cancelled"))
            with self._cond:
                self._prefilling.remove(request)
        rows = [i for i, r in enumerate(self._running) if not r.cancelled]
        if len(rows) == len(self._running):
            return
        for request in self._running:
            if request.cancelled:
                self._release(request)
                self.cancelled += 1
                self._finish(request, Event("", finish_reason="cancelled"))
        self._batch = self.backend.keep(self._batch, rows)
        with self._cond:
            self._running = [self._running[i] for i in rows]

    def _prefill(self) -> None:
        """Prefill admitted prompts, first come first served, up to the per-loop token budget."""
        budget = self.limits.prefill_chunk_tokens
        while self._prefilling and budget > 0:
            request = self._prefilling[0]
            if request.sequence is None:
                request.sequence = Sequence(self.tokenizer, request.params,
                                            self.backend.eos_token_ids)
                request.generator = request.params.make_generator()
            piece = request.prompt_ids[request.prefilled:request.prefilled + budget]
            try:
                logits, request.cache = self.backend.prefill(piece, request.cache)
            except Exception as error:
                log.exception("request %d: prefill failed", request.id)
                self._release(request)
                self._finish(request, Event("", finish_reason="error", error=str(error)))
                with self._cond:
                    self._prefilling.pop(0)
                continue
            request.prefilled += len(piece)
            budget -= len(piece)
            if request.prefilled == len(request.prompt_ids):
                self._start(request, logits)
                with self._cond:
                    self._prefilling.pop(0)

    def _start(self, request: Request, logits) -> None:
        """A fully prefilled request: its first token, then a row of the batch."""
        token, logprob = sample_token(logits, request.params, request.generator)
        event = request.sequence.accept(token, logprob)
        self._emit(request, event)
        cache, request.cache = request.cache, None
        if event.finish_reason is not None:
            self._release(request)
            return
        self._batch = self.backend.join(self._batch, cache)
        with self._cond:
            self._running.append(request)

    def _step(self) -> None:
        running = self._running
        try:
            logits = self.backend.step(self._batch, [r.sequence.tokens[-1] for r in running],
                                       [r.position for r in running])
        except Exception as error:
            log.exception("decode step failed; ending the %d running requests", len(running))
            self._fail_all(running, str(error))
            return
        logits = logits.cpu()                    # one transfer for the whole batch
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(running))
        for i, request in enumerate(running):
            token, logprob = sample_token(logits[i], request.params, request.generator)
            event = request.sequence.accept(token, logprob)
            self._emit(request, event)
            if event.finish_reason is not None:
                self._release(request)
        # a request cancelled during this step stays until the next loop drops it
        keep = [i for i in range(len(running)) if running[i].sequence.finish_reason is None]
        if len(keep) < len(running):
            self._batch = self.backend.keep(self._batch, keep)
            with self._cond:
                self._running = [running[i] for i in keep]
