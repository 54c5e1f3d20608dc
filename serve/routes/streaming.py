"""One /v1/completions call in flight: its engine requests' token ids -> text (with stop strings) -> one JSON body,
or Server-Sent Events as the tokens come. Whichever way it ends (done, error, the client leaving, --request-timeout),
every engine request is cancelled (its batch row freed at the engine's next step) and the outcome counted once."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from tokenizers import Tokenizer

from ..engine import EngineError, RequestHandle
from ..metrics import Metrics
from .errors import APIError

Event = tuple[str, int, Any, int]  # (kind, choice index, value, n_tokens): delta | finish | error | gone


class TextStream:
    """Token ids -> text deltas, honouring stop strings: text that could be the start of a stop string is held
    back until it cannot be; the stop string itself is never returned. Incomplete UTF-8 is held back too."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], eos_id: Optional[int]):
        self.tokenizer, self.stops, self.eos_id = tokenizer, stops, eos_id
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        if token == self.eos_id:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        if self.text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self._take(len(self.text))
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._take(len(self.text) - hold)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        out = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out


class Completion:
    """The engine requests of one completion call (one per prompt), each drained by a task into one event queue."""

    def __init__(self, handles: list[RequestHandle], texts: list[TextStream], model_name: str, n_prompt: int,
                 metrics: Metrics, deadline: Optional[float] = None, timeout: Optional[float] = None):
        self.handles, self.model_name, self.n_prompt, self.metrics = handles, model_name, n_prompt, metrics
        self.deadline, self.timeout = deadline, timeout  # time.monotonic() deadline, and the --request-timeout
        self.rid = f"cmpl-{uuid.uuid4().hex}"
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.tasks = [asyncio.create_task(_drive(i, h, t, self.events)) for i, (h, t) in enumerate(zip(handles, texts))]

    def cancel_all(self) -> None:
        for h in self.handles:
            h.cancel()
        for t in self.tasks:
            t.cancel()

    def chunk(self, choices: list[dict], usage: Optional[dict] = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.rid, "object": "text_completion", "created": int(time.time()),
                               "model": self.model_name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    async def next_event(self) -> Event:
        """The next event; asyncio.TimeoutError once the deadline has passed."""
        if self.deadline is None:
            return await self.events.get()
        return await asyncio.wait_for(self.events.get(), max(0.0, self.deadline - time.monotonic()))

    def timeout_message(self) -> str:
        return (f"the request did not finish within the server's --request-timeout of {self.timeout:g} s "
                f"(ask for fewer tokens, or retry when the server is less busy)")

    def usage(self, n_out: int) -> dict[str, int]:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n_out, "total_tokens": self.n_prompt + n_out}

    # ------------------------------------------------------------------------------------------ one JSON body
    async def collect(self, request: Request) -> Response | dict[str, Any]:
        """Wait for every choice; 499 (nobody listening, nginx's "client closed request") if the client left."""
        gone: list[bool] = []

        def on_disconnect() -> None:
            gone.append(True)
            self.cancel_all()
            self.events.put_nowait(("gone", -1, None, 0))  # wake the collector below

        watcher = asyncio.create_task(_watch_disconnect(request, on_disconnect))
        n = len(self.handles)
        texts: list[str] = [""] * n
        reasons: list[Optional[str]] = [None] * n
        n_out = 0
        try:
            finished = 0
            while finished < n and not gone:
                try:
                    kind, i, value, count = await self.next_event()
                except asyncio.TimeoutError:
                    self.metrics.outcome("completions", "timeout")
                    raise APIError(408, self.timeout_message(), "timeout", code="request_timeout") from None
                if kind == "gone":
                    break
                if kind == "error":
                    self.metrics.outcome("completions", "error")
                    raise APIError(500, f"generation failed: {value}", "server_error")
                if kind == "delta":
                    texts[i] += value
                else:
                    reasons[i] = value
                    n_out += count
                    finished += 1
        finally:
            watcher.cancel()
            self.cancel_all()
        if gone or any(r == "cancelled" for r in reasons):
            self.metrics.outcome("completions", "cancelled")
            return Response(status_code=499)
        self.metrics.outcome("completions", "success")
        return self.chunk([{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                           for i, (t, r) in enumerate(zip(texts, reasons))], self.usage(n_out))

    # ------------------------------------------------------------------------------------------ Server-Sent Events
    def stream(self, include_usage: bool) -> StreamingResponse:
        """`data: {chunk}` per text delta and per finish (what is ready is coalesced into one write), then the usage
        chunk if asked for, then `data: [DONE]`; an engine failure or the --request-timeout becomes one
        `data: {"error": ...}` event (then `data: [DONE]`)."""
        # the chunks' fixed head, written once: each event then costs one json.dumps of its text
        head = (f'data: {{"id": "{self.rid}", "object": "text_completion", "created": {int(time.time())}, '
                f'"model": {json.dumps(self.model_name)}, "choices": [')

        def event(i: int, text: str, reason: Optional[str]) -> str:
            return (f'{head}{{"text": {json.dumps(text)}, "index": {i}, "logprobs": null, '
                    f'"finish_reason": {json.dumps(reason)}}}]}}\n\n')

        return StreamingResponse(self._sse(event, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, event: Callable[[int, str, Optional[str]], str], include_usage: bool) -> AsyncIterator[str]:
        n = len(self.handles)
        finished, n_out, outcome = 0, 0, "cancelled"
        try:
            while finished < n:
                try:
                    batch = [await self.next_event()]
                except asyncio.TimeoutError:
                    outcome = "timeout"
                    err = {"error": {"message": self.timeout_message(), "type": "timeout", "param": None,
                                     "code": "request_timeout"}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                while not self.events.empty():  # coalesce what is ready into one write
                    batch.append(self.events.get_nowait())
                out = []
                for kind, i, value, count in batch:
                    if kind == "error":
                        outcome = "error"
                        err = {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
                        out.append(f"data: {json.dumps(err)}\n\n")
                        finished = n + 1
                        break
                    if kind == "delta":
                        out.append(event(i, value, None))
                    else:
                        finished += 1
                        n_out += count
                        out.append(event(i, "", value))
                yield "".join(out)
            if finished == n:
                outcome = "success"
                if include_usage:
                    yield "data: " + json.dumps(self.chunk([], self.usage(n_out))) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # normal end, error, or the client went away (the response task is cancelled)
            self.cancel_all()
            self.metrics.outcome("completions", outcome)


async def _drive(i: int, h: RequestHandle, text: TextStream, events: asyncio.Queue[Event]) -> None:
    """Consume one request's tokens into ("delta", i, text, 0) events and one ("finish", i, reason, n_tokens)."""
    n = 0
    try:
        async for token in h:
            n += 1
            delta = text.add(token)
            if delta:
                await events.put(("delta", i, delta, 0))
            if text.stopped:
                h.cancel("stop")
                await events.put(("finish", i, "stop", n))
                return
        tail = text.flush()
        if tail:
            await events.put(("delta", i, tail, 0))
        await events.put(("finish", i, h.finish_reason or "stop", n))
    except EngineError as e:
        await events.put(("error", i, str(e), n))


async def _watch_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """After the body is read, the next ASGI message is `http.disconnect` if the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return
