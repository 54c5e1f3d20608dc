"""The continuous-batching engine: one background thread runs the model; requests join and leave the running batch
at every decode step.

One iteration of the loop:

1. drop the rows whose client went away (`RequestHandle.cancel`) and run queued side jobs (`Engine.call`, e.g. a
   KServe `infer`), so nothing else ever touches the backend concurrently;
2. admit waiting requests while the batch has room: prefill them together (prompts left-padded to the longest,
   attention mask 0 on the padding), sample each one's first token, and join them to the running batch;
3. one decode step for every running row at once: the batch's last tokens go in as (B, 1) with each row's own
   position and mask; each row samples its next token with its own parameters and generator;
4. rows that hit `max_tokens`, end-of-text or a cancel leave; their cache rows are cut out and the columns that
   only held padding are trimmed, so the batch's cache length stays the longest live sequence.

The batch's KV cache is one tensor pair per layer, (B, H_kv, L, D), each row's real tokens right-aligned in the
last `length` columns and zero padding on the left (masked). Joining pads the shorter side on the left; leaving
is an `index_select`. The model and the exported decoder take explicit `position_ids`, so padding never shifts a
row's positions, and greedy tokens match `model.generate` run alone.

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

from .backends.base import Backend, KVCache


class QueueFull(Exception):
    """The waiting queue is at --max-queue; the caller should retry later (HTTP 503 + Retry-After)."""


class EngineStopped(Exception):
    """The engine no longer admits requests (shutting down)."""


class EngineError(Exception):
    """The model step failed for this request."""


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
                 max_model_len: Optional[int] = None, metrics=None):
        self.backend = backend
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue = max(0, int(max_queue))
        self.max_model_len = min(max_model_len or backend.max_context, backend.max_context)
        self.metrics = metrics
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._rows: list[RequestHandle] = []
        self._outbox: dict = {}  # event loop -> [(queue, item)], flushed after every step
        self._cache: Optional[KVCache] = None
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
        return len(self._rows)

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
            free_slots = max(0, self.max_batch_size - len(self._rows))
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
            self.metrics.set_load(len(self._rows), len(self._waiting))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopped or self._waiting or self._rows or self._calls):
                    self._cond.wait()
                if self._stopped:
                    break
                calls = list(self._calls)
                self._calls.clear()
                for h in [h for h in self._waiting if h.cancelled]:
                    self._waiting.remove(h)
                    self._finish(h, h.cancel_reason)
                room = self.max_batch_size - len(self._rows)
                admit = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                self._gauge()
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - not swallowed: the caller's future raises it
                        fut.set_exception(e)
            try:
                self._drop([i for i, h in enumerate(self._rows) if h.cancelled], "cancelled")
                if admit:
                    self._prefill(admit)
                if self._rows:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests (they get the error), not the server
                for h in self._rows + admit:
                    if h.finish_reason is None and h.error is None:
                        h.error = f"{type(e).__name__}: {e}"
                        h._push(("error", h.error))
                        if self.metrics is not None:
                            self.metrics.request_done(h, "error")
                self._rows, self._cache = [], None
            self._flush()
            with self._cond:
                self._gauge()
        # stopped: whatever is left ends with an error
        with self._cond:
            leftovers = list(self._waiting) + self._rows
            self._waiting.clear()
            self._rows, self._cache = [], None
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

    def _prefill(self, new: list[RequestHandle]) -> None:
        now = time.perf_counter()
        for h in new:
            h.t_admitted = now
            if self.metrics is not None:
                self.metrics.admitted(h, now)
        T = max(len(h.prompt_ids) for h in new)
        ids = torch.zeros(len(new), T, dtype=torch.long)
        mask = torch.zeros(len(new), T, dtype=torch.long)
        for i, h in enumerate(new):
            n = len(h.prompt_ids)
            ids[i, T - n:] = torch.tensor(h.prompt_ids)
            mask[i, T - n:] = 1
            h.length = n
        logits, cache = self.backend.prefill(ids, mask)
        done = self._emit(new, self._sample(logits, new))
        keep = [i for i in range(len(new)) if i not in set(done)]
        if not keep:
            return
        if len(keep) < len(new):
            idx = torch.tensor(keep, device=cache[0][0].device)
            cache = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in cache]
            new = [new[i] for i in keep]
            cache = _trim(cache, max(h.length for h in new))
        self._join(new, cache)

    def _join(self, new: list[RequestHandle], cache: KVCache) -> None:
        if not self._rows:
            self._rows, self._cache = list(new), cache
            return
        L_old, L_new = self._cache[0][0].shape[2], cache[0][0].shape[2]
        L = max(L_old, L_new)
        self._cache = [(torch.cat([_pad_left(k0, L), _pad_left(k1, L)]),
                        torch.cat([_pad_left(v0, L), _pad_left(v1, L)]))
                       for (k0, v0), (k1, v1) in zip(self._cache, cache)]
        self._rows = self._rows + list(new)

    def _decode(self) -> None:
        rows = self._rows
        B, L = len(rows), self._cache[0][0].shape[2]
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, B)
        if self.metrics is not None:
            self.metrics.batch(B)
        tokens = torch.tensor([h.tokens[-1] for h in rows], dtype=torch.long)
        lengths = torch.tensor([h.length for h in rows], dtype=torch.long)
        # (B, L + 1): real columns are each row's last length + 1 (its cache plus the token going in now)
        mask = (torch.arange(L + 1).unsqueeze(0) >= (L - lengths).unsqueeze(1)).long()
        logits, self._cache = self.backend.decode(tokens, mask, lengths, self._cache)
        for h in rows:
            h.length += 1
        done = self._emit(rows, self._sample(logits, rows))
        self._drop(done, None)

    def _drop(self, indices: list[int], reason: Optional[str]) -> None:
        """Remove rows (finished, or cancelled when `reason` is given) and trim padding-only cache columns."""
        if not indices:
            return
        gone = set(indices)
        if reason is not None:
            for i in indices:
                self._finish(self._rows[i], self._rows[i].cancel_reason)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            return
        idx = torch.tensor(keep, device=self._cache[0][0].device)
        self._cache = _trim([(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self._cache],
                            max(h.length for h in self._rows))


def _pad_left(x: torch.Tensor, L: int) -> torch.Tensor:
    """(B, H, l, D) -> (B, H, L, D) with zeros in front."""
    extra = L - x.shape[2]
    if extra == 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], extra, x.shape[3]), x], dim=2)


def _trim(cache: KVCache, length: int) -> KVCache:
    """Keep the last `length` columns (the older ones are padding for every remaining row)."""
    L = cache[0][0].shape[2]
    if length >= L:
        return cache
    return [(k[:, :, L - length:], v[:, :, L - length:]) for k, v in cache]
