"""The continuous-batching engine: one background thread runs the model; requests join and leave the running batch
at every decode step, each in its own slot of a preallocated KV cache.

One iteration of the loop:

1. drop the requests whose client went away (`RequestHandle.cancel`) and run queued side jobs (`Engine.call`, e.g.
   a KServe `infer`), so nothing else ever touches the backend concurrently;
2. prefill, within a budget of `prefill_chunk` prompt tokens per iteration: the request being prefilled gets its
   next chunk (`backend.prefill_slot`, one request at a time, no padding); a request whose prompt is done samples
   its first token and joins the running batch; while budget and a free slot are left, the next waiting request
   starts. The budget bounds how long a prefill stalls the running requests' next token (inter-token latency);
   128 tokens per iteration is the default, chosen by measurement (see `DEFAULT_PREFILL_CHUNK`);
3. one decode step for every running request at once (`backend.decode_slots` on slots [0, n)): each row's last
   token goes in with its own position and length; each row samples its next token with its own parameters;
4. requests that hit `max_tokens`, end-of-text or a cancel leave: the last running request's rows move into the
   freed slot, so the running requests stay in slots [0, n) and a decode step reads one contiguous block.

The cache (`backends.slot_cache.SlotCache`): per layer (slots, kv_heads, capacity, head_dim); the request in slot
s has its tokens in columns [0, length_s). Joining writes only that request's slot, leaving copies at most one
request's rows, a decode step writes one column per row. The columns are allocated in chunks as the live requests
need them, not at `max_model_len` up front (the docstring of `slot_cache.py` gives the sizes), and released when
the engine is idle. Greedy tokens match `model.generate` run alone: the model and the exported decoder take an
explicit mask and `position_ids`, so the masked columns after a row's length change nothing.

Results go back to the asyncio side through `loop.call_soon_threadsafe` into each request's queue.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from model.sampling import sample_next

from .backends.base import Backend
from .backends.slot_cache import SlotCache


class QueueFull(Exception):
    """The waiting queue is at --max-queue; the caller should retry later (HTTP 503 + Retry-After)."""


class EngineStopped(Exception):
    """The engine no longer admits requests (shutting down)."""


class EngineError(Exception):
    """The model step failed for this request."""


# Prompt tokens prefilled per loop iteration: a bounded budget keeps a burst of newcomers from stalling the running
# requests' next token for all of their prompts at once. Measured on GPT-2 124M int8 (2-core CPU, 16 closed-loop
# clients, 128-token prompts; in-process, two rounds on a loaded machine): 128 gave TTFT p50 0.24-0.41 s against
# 0.60-0.69 s for 32 (a prompt spread over 4 steps) and 0.88-1.08 s for unbounded (a burst prefilled before any
# decode), with throughput within the machine's noise; each decode step at 16 rows costs ~110 ms there anyway.
DEFAULT_PREFILL_CHUNK = 128

# Below this temperature sampling is greedy: logits / 1e-300 overflow to inf, softmax gives NaN, and
# torch.multinomial would fail the whole batch's step (every row's request) for one request's parameter.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return not self.temperature >= MIN_TEMPERATURE  # NaN too


class RequestHandle:
    """One submitted generation. `async for token in handle` yields token ids; then `finish_reason` is set
    ("length" or "stop"). `cancel()` makes the engine drop the request at its next step."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: Optional[asyncio.AbstractEventLoop]):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue() if loop is not None else None
        self.outbox: dict = {}  # the engine's per-step delivery buffer (set by Engine.submit)
        self.sync_done = threading.Event()
        self.sync_tokens: list[int] = []
        self.tokens: list[int] = []  # engine-side: generated so far
        self.length = 0  # engine-side: tokens in this row's cache
        self.cancelled = False
        self.cancel_reason = "cancelled"
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self.t_arrival = time.perf_counter()
        self.t_admitted: Optional[float] = None
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop generating: "cancelled" (the client went away) or "stop" (a stop string matched)."""
        self.cancel_reason = reason
        self.cancelled = True

    # -- engine thread -> consumer
    def _push(self, item: tuple) -> None:
        if self.loop is None:
            if item[0] == "token":
                self.sync_tokens.append(item[1])
            else:
                self.finish_reason, self.error = (item[1], None) if item[0] == "done" else (None, item[1])
                self.sync_done.set()
            return
        # collected by the engine, handed to the loop once per step (one wake-up per step, not per token)
        self.outbox.setdefault(self.loop, []).append((self.queue, item))

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while True:
            kind, value = await self.queue.get()
            if kind == "token":
                yield value
            elif kind == "done":
                self.finish_reason = value
                return
            else:
                self.error = value
                raise EngineError(value)

    def result(self, timeout: Optional[float] = None) -> list[int]:
        """Blocking wait for a request submitted without an event loop (`loop=None`)."""
        if not self.sync_done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
        if self.error:
            raise EngineError(self.error)
        return self.sync_tokens


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class Engine:
    def __init__(self, backend: Backend, *, max_batch_size: int = 16, max_queue: int = 64,
                 max_model_len: Optional[int] = None, metrics=None,
                 prefill_chunk: Optional[int] = DEFAULT_PREFILL_CHUNK):
        """prefill_chunk: prompt tokens prefilled per iteration (None = every waiting prompt that has a slot, at
        once); the KV cache has `max_batch_size` slots of up to `max_model_len` columns."""
        self.backend = backend
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue = max(0, int(max_queue))
        self.max_model_len = min(max_model_len or backend.max_context, backend.max_context)
        self.prefill_chunk = None if prefill_chunk is None else max(1, int(prefill_chunk))
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._rows: list[RequestHandle] = []  # decoding, _rows[i] in slot i
        self._filling: Optional[RequestHandle] = None  # being prefilled, in slot len(_rows)
        self._outbox: dict = {}  # event loop -> [(queue, item)], flushed after every step
        self._cache: Optional[SlotCache] = None  # made on first use
        self._accepting = True
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0  # decode steps run (for tests and stats)
        self.max_batch_seen = 0

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hotpath-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._stopped

    @property
    def num_running(self) -> int:
        return len(self._rows) + (self._filling is not None)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def stop_admitting(self) -> None:
        """New submits raise EngineStopped; running and waiting requests carry on (graceful drain)."""
        self._accepting = False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop: requests still waiting or running end with an error."""
        with self._cond:
            self._accepting = False
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               loop: Optional[asyncio.AbstractEventLoop] = None) -> RequestHandle:
        """Queue a generation. Raises ValueError (bad prompt/params), QueueFull or EngineStopped."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens and max_tokens is {params.max_tokens}: {n + params.max_tokens}"
                             f" tokens, over the maximum context length of {self.max_model_len}")
        bad = [t for t in prompt_ids if not 0 <= t < self.backend.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.backend.vocab_size})")
        handle = RequestHandle(prompt_ids, params, loop)
        handle.outbox = self._outbox
        with self._cond:
            if not self.accepting:
                raise EngineStopped("the server is shutting down")
            free_slots = max(0, self.max_batch_size - self.num_running)
            if len(self._waiting) >= self.max_queue + free_slots:  # those about to join the batch don't queue
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(handle)
            self._gauge()
            self._cond.notify_all()
        return handle

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between steps (exclusive use of the backend); returns a Future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopped:
                raise EngineStopped("the server is shutting down")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: Optional[float] = None) -> list[int]:
        """Blocking convenience: submit and wait (for scripts, Ray replicas and tests)."""
        return self.submit(prompt_ids, params).result(timeout)

    # ------------------------------------------------------------------ engine thread
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(self.num_running, len(self._waiting))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopped or self._waiting or self._rows or self._filling or self._calls):
                    self._cond.wait()
                if self._stopped:
                    break
                calls = list(self._calls)
                self._calls.clear()
                for h in [h for h in self._waiting if h.cancelled]:
                    self._waiting.remove(h)
                    self._finish(h, h.cancel_reason)
                self._gauge()
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - not swallowed: the caller's future raises it
                        fut.set_exception(e)
            try:
                self._drop([i for i, h in enumerate(self._rows) if h.cancelled], "cancelled")
                if self._filling is not None and self._filling.cancelled:
                    h, self._filling = self._filling, None
                    self._finish(h, h.cancel_reason)
                self._prefill()
                if self._rows:
                    self._decode()
                if not self._rows and self._filling is None and self._cache is not None:
                    self._cache.fit(0, 0, 0)  # idle: give the memory back
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests (they get the error), not the server
                failed = self._rows + ([self._filling] if self._filling is not None else [])
                for h in failed:
                    if h.finish_reason is None and h.error is None:
                        h.error = f"{type(e).__name__}: {e}"
                        h._push(("error", h.error))
                        if self.metrics is not None:
                            self.metrics.request_done(h, "error")
                self._rows, self._filling, self._cache = [], None, None
            self._flush()
            with self._cond:
                self._gauge()
        # stopped: whatever is left ends with an error
        with self._cond:
            leftovers = list(self._waiting) + self._rows + ([self._filling] if self._filling is not None else [])
            self._waiting.clear()
            self._rows, self._filling, self._cache = [], None, None
            calls = list(self._calls)
            self._calls.clear()
        for h in leftovers:
            h._push(("error", "the server shut down before this request finished"))
        self._flush()
        for _, fut in calls:
            fut.cancel()

    def _flush(self) -> None:
        pending = list(self._outbox.items())  # only the engine thread writes the outbox
        self._outbox.clear()
        for loop, items in pending:
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _finish(self, h: RequestHandle, reason: str) -> None:
        h.finish_reason = reason
        h._push(("done", reason))
        if self.metrics is not None:
            self.metrics.request_done(h, reason)

    def _sample(self, logits: torch.Tensor, rows: list[RequestHandle]) -> list[int]:
        """logits (B, V) float32 -> one token per row, each with its own sampling parameters."""
        out = logits.argmax(-1).tolist()
        for i, h in enumerate(rows):
            p = h.params
            if not p.greedy:
                out[i] = int(sample_next(logits[i:i + 1], temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                         generator=h.generator).item())
        return out

    def _emit(self, rows: list[RequestHandle], tokens: list[int]) -> list[int]:
        """Deliver one new token per row; returns the indices of rows that are done."""
        now = time.perf_counter()
        done = []
        eos = self.backend.eos_id
        for i, (h, t) in enumerate(zip(rows, tokens)):
            h.tokens.append(t)
            if self.metrics is not None:
                self.metrics.token(h, now)
            if h.t_first is None:
                h.t_first = now
            h.t_last = now
            h._push(("token", t))
            if t == eos and eos is not None:
                self._finish(h, "stop")
                done.append(i)
            elif len(h.tokens) >= h.params.max_tokens or h.length + 1 > self.max_model_len:
                self._finish(h, "length")
                done.append(i)
        return done

    def _fit(self, columns: int) -> SlotCache:
        """The cache, with room for `columns` columns and for every live request's next token."""
        if self._cache is None:
            self._cache = self.backend.new_cache(self.max_batch_size, self.max_model_len)
        lengths = [h.length for h in self._rows]
        used = max(lengths + ([self._filling.length] if self._filling is not None else []), default=0)
        need = max(columns, max(lengths, default=-1) + 1)
        self._cache.fit(need, len(self._rows) + (self._filling is not None), used)
        return self._cache

    def _next_to_fill(self) -> Optional[RequestHandle]:
        """The request being prefilled, or the next waiting one when a slot is free (it takes slot len(_rows))."""
        if self._filling is None and len(self._rows) < self.max_batch_size:
            with self._cond:
                if self._waiting:
                    h = self._filling = self._waiting.popleft()
                    h.length = 0
                    h.t_admitted = time.perf_counter()
                    if self.metrics is not None:
                        self.metrics.admitted(h, h.t_admitted)
                    self._gauge()
        return self._filling

    def _prefill(self) -> None:
        """Spend up to `prefill_chunk` prompt tokens: continue the request being prefilled, then start waiting ones."""
        budget = self.prefill_chunk if self.prefill_chunk is not None else self.max_batch_size * self.max_model_len
        while budget > 0:
            h = self._next_to_fill()
            if h is None:
                return
            done, n = h.length, min(budget, len(h.prompt_ids) - h.length)
            cache = self._fit(done + n)
            ids = torch.tensor([h.prompt_ids[done:done + n]], dtype=torch.long)
            logits = self.backend.prefill_slot(cache, len(self._rows), ids, offset=done)
            h.length += n
            budget -= n
            if h.length < len(h.prompt_ids):
                continue  # the budget ran out inside this prompt: the rest next iteration
            self._filling = None
            if not self._emit([h], self._sample(logits.view(1, -1), [h])):
                self._rows.append(h)  # it is in slot len(_rows) already

    def _decode(self) -> None:
        rows = self._rows
        B = len(rows)
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, B)
        if self.metrics is not None:
            self.metrics.batch(B)
        cache = self._fit(0)
        tokens = torch.tensor([h.tokens[-1] for h in rows], dtype=torch.long)
        lengths = torch.tensor([h.length for h in rows], dtype=torch.long)
        logits = self.backend.decode_slots(cache, 0, B, tokens, lengths)
        for h in rows:
            h.length += 1
        done = self._emit(rows, self._sample(logits, rows))
        self._drop(done, None)

    def _drop(self, indices: list[int], reason: Optional[str]) -> None:
        """Remove running requests (finished, or cancelled when `reason` is given): the last running ones move into
        the freed slots, so the rest stay in slots [0, n); the request being prefilled moves to slot n."""
        if not indices:
            return
        gone = set(indices)
        rows = self._rows
        if reason is not None:
            for i in indices:
                self._finish(rows[i], rows[i].cancel_reason)
        n = len(rows) - len(gone)
        holes = [i for i in sorted(gone) if i < n]
        movers = [i for i in range(n, len(rows)) if i not in gone]
        for hole, src in zip(holes, movers):
            if self._cache is not None:
                self._cache.move(src, hole, rows[src].length)
            rows[hole] = rows[src]
        if self._filling is not None and self._cache is not None:
            self._cache.move(len(rows), n, self._filling.length)
        self._rows = rows[:n]
