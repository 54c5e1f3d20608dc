"""The HTTP server: OpenAI-compatible completions, KServe v2 (Open Inference Protocol), Prometheus metrics.

`create_app(backend, ...)` returns a FastAPI app whose lifespan starts and stops the continuous-batching `Engine`;
the routes live in `serve/routes/` (one router per API) and read the engine, metrics and model name from
`app.state.server`.

Errors: `/v1/*` answers with OpenAI's error object `{"error": {"message", "type", "param", "code"}}`; `/v2/*` with the
Open Inference Protocol's `{"error": "<message>"}`. Malformed JSON -> 400, wrong types -> 422, bad values -> 400,
prompt + max_tokens over the context -> 400 stating the numbers, queue full -> 503 with `Retry-After`, shutting
down -> 503, missing or wrong `Authorization: Bearer` (with `--api-key`) -> 401, a body over `--max-request-bytes`
-> 413 (before it is read whole), not finished within `--request-timeout` -> 408.
"""
from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator, Optional

from fastapi import FastAPI

from .backends.base import Backend
from .engine import DEFAULT_PREFILL_CHUNK, Engine
from .metrics import Metrics
from .routes import kserve, openai, ops
from .routes.auth import APIKeyMiddleware
from .routes.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimitMiddleware
from .routes.errors import add_error_handlers
from .routes.schemas import max_chars_per_token
from .routes.state import ServerState


def create_app(backend: Backend, *, model_name: str = "model", max_batch_size: int = 16, max_queue: int = 64,
               max_model_len: Optional[int] = None, api_key: Optional[str] = None,
               ready_message: Optional[str] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               request_timeout: Optional[float] = None, prefill_chunk: Optional[int] = DEFAULT_PREFILL_CHUNK
               ) -> FastAPI:
    metrics = Metrics()
    metrics.set_model(model_name, backend.name)
    engine = Engine(backend, max_batch_size=max_batch_size, max_queue=max_queue, max_model_len=max_model_len,
                    metrics=metrics, prefill_chunk=prefill_chunk)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if ready_message:
            print(ready_message, flush=True)
        yield
        engine.stop()

    app = FastAPI(title="hotpath serve", lifespan=lifespan)
    app.state.server = ServerState(backend=backend, engine=engine, metrics=metrics, model_name=model_name,
                                   created=int(time.time()),
                                   max_chars_per_token=max_chars_per_token(backend.tokenizer),
                                   request_timeout=request_timeout)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, metrics=metrics)
    # added last, so outermost: an oversized body is refused before anything else looks at the request
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes, metrics=metrics)
    add_error_handlers(app)
    for api in (openai, kserve, ops):
        app.include_router(api.router)
    return app
