"""The HTTP server: OpenAI-compatible completions, KServe v2 (Open Inference Protocol), Prometheus metrics.

`create_app(backend, ...)` returns a FastAPI app whose lifespan starts and stops the continuous-batching `Engine`.

Errors: `/v1/*` answers with OpenAI's error object `{"error": {"message", "type", "param", "code"}}`; `/v2/*` with the
Open Inference Protocol's `{"error": "<message>"}`. Malformed JSON -> 400, wrong types -> 422, bad values -> 400,
prompt + max_tokens over the context -> 400 stating the numbers, queue full -> 503 with `Retry-After`, shutting
down -> 503, missing or wrong `Authorization: Bearer` (with `--api-key`) -> 401.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any, Optional, Union

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from common.version import hotpath_version

from .engine import Engine, EngineError, EngineStopped, QueueFull, RequestHandle, SamplingParams
from .metrics import CONTENT_TYPE, Metrics

RETRY_AFTER_S = 1
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics")  # probes and scraping need no key


# ---------------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(path: str, status: int, message: str, type_: str = "invalid_request_error",
                   param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    if path.startswith("/v2"):
        body: dict[str, Any] = {"error": message}
    else:
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------------- schemas
class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = 16
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    top_k: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    best_of: Optional[int] = None
    echo: bool = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    user: Optional[str] = None


def _check_params(req: CompletionRequest) -> None:
    def bad(msg, param):
        raise APIError(400, msg, param=param)

    if req.n != 1 or (req.best_of not in (None, 1)):
        bad("only n=1 and best_of=1 are supported", "n")
    if req.echo:
        bad("echo is not supported", "echo")
    if req.logprobs is not None:
        bad("logprobs are not supported", "logprobs")
    if req.suffix:
        bad("suffix is not supported", "suffix")
    if req.presence_penalty or req.frequency_penalty:
        bad("presence_penalty and frequency_penalty are not supported (leave them 0)", "presence_penalty")
    if req.max_tokens is not None and req.max_tokens < 1:
        bad(f"max_tokens must be at least 1, got {req.max_tokens}", "max_tokens")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        bad(f"temperature must be in [0, 2], got {req.temperature}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        bad(f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < -1:
        bad(f"top_k must be -1 (off) or positive, got {req.top_k}", "top_k")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        bad("stop takes up to 4 non-empty strings", "stop")


# ---------------------------------------------------------------------------------------------------- text
class TextStream:
    """Token ids -> text deltas, honouring stop strings: text that could be the start of a stop string is held
    back until it cannot be; the stop string itself is never returned. Incomplete UTF-8 is held back too."""

    def __init__(self, tokenizer, stops: list[str], eos_id: Optional[int]):
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


# ---------------------------------------------------------------------------------------------------- auth
class APIKeyMiddleware:
    """Pure ASGI (streams and disconnects pass through untouched): `Authorization: Bearer <key>` or 401."""

    def __init__(self, app, api_key: str, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            self.metrics.outcome(_endpoint(scope["path"]), "unauthorized")
            what = "no Authorization header" if not auth else "a wrong API key"
            resp = error_response(scope["path"], 401, f"the request has {what} (send Authorization: Bearer <key>)",
                                  "authentication_error", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def _endpoint(path: str) -> str:
    if path.startswith("/v1/completions"):
        return "completions"
    if path.endswith("/infer"):
        return "infer"
    return "other"


# ---------------------------------------------------------------------------------------------------- app
def create_app(backend, *, model_name: str = "model", max_batch_size: int = 16, max_queue: int = 64,
               max_model_len: Optional[int] = None, api_key: Optional[str] = None,
               ready_message: Optional[str] = None) -> FastAPI:
    metrics = Metrics()
    metrics.set_model(model_name, backend.name)
    engine = Engine(backend, max_batch_size=max_batch_size, max_queue=max_queue, max_model_len=max_model_len,
                    metrics=metrics)
    tokenizer = backend.tokenizer
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        if ready_message:
            print(ready_message, flush=True)
        yield
        engine.stop()

    app = FastAPI(title="hotpath serve", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.backend = engine, metrics, backend
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(request.url.path, e.status, e.message, e.type, e.param, e.code, e.headers)

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(request.url.path, 422, _describe(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(request.url.path, e.status_code, str(e.detail),
                              "not_found_error" if e.status_code == 404 else "invalid_request_error")

    def submit_all(prompts: list[list[int]], params: SamplingParams, endpoint: str) -> list[RequestHandle]:
        loop = asyncio.get_running_loop()
        handles: list[RequestHandle] = []
        try:
            for ids in prompts:
                handles.append(engine.submit(ids, params, loop))
        except (QueueFull, EngineStopped, ValueError) as e:
            for h in handles:
                h.cancel()
            if isinstance(e, ValueError):
                metrics.outcome(endpoint, "invalid")
                raise APIError(400, str(e), param="prompt") from e
            metrics.outcome(endpoint, "rejected")
            msg = (f"the server is busy: {e}; retry after {RETRY_AFTER_S} s" if isinstance(e, QueueFull)
                   else "the server is shutting down and admits no new requests")
            raise APIError(503, msg, "server_overloaded" if isinstance(e, QueueFull) else "server_shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from e
        return handles

    # ------------------------------------------------------------------------------------------ OpenAI
    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "hotpath", "max_model_len": engine.max_model_len,
                                            "backend": backend.description}]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist (this server serves {model_name!r})",
                           code="model_not_found", param="model")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "hotpath"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            metrics.outcome("completions", "invalid")
            raise APIError(400, f"the body is not valid JSON ({e})") from e
        try:
            req = CompletionRequest.model_validate(payload)
        except ValidationError as e:
            metrics.outcome("completions", "invalid")
            raise APIError(422, _describe(e.errors())) from e
        try:
            _check_params(req)
            if req.model and req.model != model_name:
                raise APIError(404, f"the model {req.model!r} does not exist (this server serves {model_name!r})",
                               param="model", code="model_not_found")
            prompts = _prompts(req.prompt, tokenizer)
            max_tokens = req.max_tokens or 16
            for ids in prompts:
                if not ids:
                    raise APIError(400, "the prompt is empty", param="prompt")
                if len(ids) + max_tokens > engine.max_model_len:
                    raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens. "
                                        f"However, you requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                                        f"prompt, {max_tokens} for the completion). Please reduce the prompt or "
                                        "max_tokens.", param="max_tokens", code="context_length_exceeded")
        except APIError:
            metrics.outcome("completions", "invalid")
            raise
        top_k = req.top_k if req.top_k and req.top_k > 0 else None
        top_p = req.top_p if req.top_p is not None and req.top_p < 1 else None
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature or 0.0, top_k=top_k, top_p=top_p,
                                seed=req.seed)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        handles = submit_all(prompts, params, "completions")
        rid = f"cmpl-{uuid.uuid4().hex}"
        events: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(_drive(i, h, TextStream(tokenizer, stops, backend.eos_id), events))
                 for i, h in enumerate(handles)]
        n_prompt = sum(len(p) for p in prompts)

        def cancel_all():
            for h in handles:
                h.cancel()
            for t in tasks:
                t.cancel()

        def chunk(choices, usage=None):
            out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            created_at = int(time.time())
            head = f'data: {{"id": "{rid}", "object": "text_completion", "created": {created_at}, ' \
                   f'"model": {json.dumps(model_name)}, "choices": ['

            def event(i, text, reason):
                return (f'{head}{{"text": {json.dumps(text)}, "index": {i}, "logprobs": null, '
                        f'"finish_reason": {json.dumps(reason)}}}]}}\n\n')

            async def sse():
                finished, n_out, outcome = 0, 0, "cancelled"
                try:
                    while finished < len(handles):
                        batch = [await events.get()]
                        while not events.empty():  # coalesce what is ready into one write
                            batch.append(events.get_nowait())
                        out = []
                        for kind, i, value, count in batch:
                            if kind == "error":
                                outcome = "error"
                                err = {"error": {"message": value, "type": "server_error", "param": None,
                                                 "code": None}}
                                out.append(f"data: {json.dumps(err)}\n\n")
                                finished = len(handles) + 1
                                break
                            if kind == "delta":
                                out.append(event(i, value, None))
                            else:
                                finished += 1
                                n_out += count
                                out.append(event(i, "", value))
                        yield "".join(out)
                    if finished == len(handles):
                        outcome = "success"
                        if include_usage:
                            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                     "total_tokens": n_prompt + n_out}
                            yield "data: " + json.dumps(chunk([], usage)) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # normal end, error, or the client went away (the response task is cancelled)
                    cancel_all()
                    metrics.outcome("completions", outcome)

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        gone: list[bool] = []

        def on_disconnect():
            gone.append(True)
            cancel_all()
            events.put_nowait(("gone", -1, None, 0))  # wake the collector below

        watcher = asyncio.create_task(_watch_disconnect(request, on_disconnect))
        texts, reasons, n_out = [""] * len(handles), [None] * len(handles), 0
        try:
            finished = 0
            while finished < len(handles) and not gone:
                kind, i, value, count = await events.get()
                if kind == "gone":
                    break
                if kind == "error":
                    metrics.outcome("completions", "error")
                    raise APIError(500, f"generation failed: {value}", "server_error")
                if kind == "delta":
                    texts[i] += value
                else:
                    reasons[i] = value
                    n_out += count
                    finished += 1
        finally:
            watcher.cancel()
            cancel_all()
        if gone or any(r == "cancelled" for r in reasons):
            metrics.outcome("completions", "cancelled")
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        metrics.outcome("completions", "success")
        return chunk([{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                      for i, (t, r) in enumerate(zip(texts, reasons))],
                     {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out})

    # ------------------------------------------------------------------------------------------ KServe v2
    V = backend.vocab_size

    def model_metadata():
        return {"name": model_name, "versions": ["1"], "platform": f"hotpath_{backend.name}",
                "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                           {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1], "optional": True}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, V]}]}

    def known(name: str):
        if name != model_name:
            raise APIError(404, f"model {name!r} is not served here (try {model_name!r})")

    @app.get("/v2")
    async def server_metadata():
        return {"name": "hotpath", "version": hotpath_version(), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        if not engine.accepting:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_model(name: str, version: Optional[str] = None):
        known(name)
        return model_metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(name: str, version: Optional[str] = None):
        known(name)
        if not engine.accepting:
            return JSONResponse({"name": name, "ready": False}, status_code=503)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(name: str, request: Request, version: Optional[str] = None):
        try:
            known(name)
            req, tensors = _parse_infer(await request.body(), request.headers)
            ids = tensors.get("input_ids")
            if ids is None:
                raise APIError(400, "the request needs an input named input_ids (INT64, shape [batch, tokens])")
            if ids.ndim != 2 or ids.size == 0:
                raise APIError(400, f"input_ids must have shape [batch, tokens], got {list(ids.shape)}")
            if ids.shape[1] > engine.max_model_len:
                raise APIError(400, f"input_ids has {ids.shape[1]} tokens, over the maximum context length of "
                                    f"{engine.max_model_len}")
            if ids.min() < 0 or ids.max() >= V:
                raise APIError(400, f"input_ids holds ids outside the vocabulary [0, {V})")
            mask = tensors.get("attention_mask")
            if mask is None:
                mask = np.ones_like(ids)
            elif mask.shape != ids.shape:
                raise APIError(400, f"attention_mask shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
            wanted = [o.get("name") for o in req.get("outputs") or []]
            if any(w != "logits" for w in wanted):
                raise APIError(400, f"unknown output {[w for w in wanted if w != 'logits'][0]!r} (this model has logits)")
        except APIError:
            metrics.outcome("infer", "invalid")
            raise
        ids_t = torch.from_numpy(ids.astype(np.int64))
        mask_t = torch.from_numpy(mask.astype(np.int64))
        pos_t = (mask_t.cumsum(-1) - 1).clamp(min=0)
        try:
            fut = engine.call(lambda: backend.forward(ids_t, mask_t, pos_t, None)[0])
        except EngineStopped as e:
            metrics.outcome("infer", "rejected")
            raise APIError(503, "the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)}) from e
        try:
            logits = (await asyncio.wrap_future(fut)).float().cpu().numpy()
        except Exception as e:
            metrics.outcome("infer", "error")
            raise APIError(500, f"inference failed: {type(e).__name__}: {e}") from e
        metrics.outcome("infer", "success")
        out_params = {o.get("name"): (o.get("parameters") or {}) for o in req.get("outputs") or []}
        binary = out_params.get("logits", {}).get("binary_data",
                                                   (req.get("parameters") or {}).get("binary_data_output", False))
        head = {"model_name": model_name, "model_version": "1", "outputs": []}
        if req.get("id") is not None:
            head["id"] = req["id"]
        out = {"name": "logits", "datatype": "FP32", "shape": list(logits.shape)}
        if binary:
            raw = logits.astype("<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            head["outputs"].append(out)
            js = json.dumps(head).encode()
            return Response(js + raw, media_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(len(js))})
        out["data"] = logits.reshape(-1).tolist()
        head["outputs"].append(out)
        return JSONResponse(head)

    # ------------------------------------------------------------------------------------------ metrics
    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


# ---------------------------------------------------------------------------------------------------- helpers
async def _drive(i: int, h: RequestHandle, text: TextStream, events: asyncio.Queue) -> None:
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


async def _watch_disconnect(request: Request, on_disconnect) -> None:
    """After the body is read, the next ASGI message is `http.disconnect` if the client goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


def _prompts(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt).ids]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    return [tokenizer.encode(p).ids if isinstance(p, str) else list(p) for p in prompt]


def _describe(errors) -> str:
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


_NP = {"INT64": np.int64, "INT32": np.int32, "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8,
       "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "FP32": np.float32, "FP64": np.float64,
       "FP16": np.float16, "BOOL": np.bool_}


def _parse_infer(body: bytes, headers) -> tuple[dict, dict[str, np.ndarray]]:
    """Open Inference Protocol request (JSON, or JSON + binary tensors) -> (request dict, {name: array})."""
    header_len = headers.get("inference-header-content-length")
    try:
        if header_len is not None:
            n = int(header_len)
            req, blob = json.loads(body[:n]), body[n:]
        else:
            req, blob = json.loads(body), b""
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not a valid inference request ({e})") from e
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise APIError(400, "the request needs an 'inputs' list")
    tensors, offset = {}, 0
    for spec in req["inputs"]:
        try:
            name, dtype, shape = spec["name"], spec["datatype"], [int(s) for s in spec["shape"]]
        except (KeyError, TypeError, ValueError) as e:
            raise APIError(400, f"every input needs name, datatype and shape ({e})") from e
        if dtype not in _NP:
            raise APIError(400, f"input {name}: datatype {dtype} is not supported (use INT64)")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        try:
            if size is not None:
                arr = np.frombuffer(blob[offset:offset + int(size)], dtype=np.dtype(_NP[dtype]).newbyteorder("<"))
                offset += int(size)
            else:
                arr = np.asarray(spec.get("data"), dtype=_NP[dtype])
            arr = arr.reshape(shape)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"input {name}: data does not match shape {shape} and datatype {dtype} ({e})") from e
        tensors[name] = arr
    return req, tensors
