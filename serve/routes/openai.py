"""OpenAI-compatible API: /v1/models, /v1/models/{name}, /v1/completions (text or token-id prompts, one or many,
plain or streamed). Prompt + max_tokens over the context -> 400 stating the numbers (a text prompt is first measured
in characters, then tokenized off the event loop); more prompts than the engine holds -> 400; queue full -> 503 with
`Retry-After`; shutting down -> 503; not finished within --request-timeout -> 408 (an SSE error event when streaming).
"""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from ..engine import EngineStopped, QueueFull, RequestHandle, SamplingParams
from .errors import RETRY_AFTER_S, APIError
from .schemas import check_prompt_chars, parse_completion, tokenize_prompts
from .spec import COMPLETIONS_BODY, COMPLETIONS_RESPONSES, OPENAI_ERRORS
from .state import Server, ServerState
from .streaming import Completion, TextStream

router = APIRouter(responses=OPENAI_ERRORS)


def _not_served(name: str, model_name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist (this server serves {model_name!r})",
                    param="model", code="model_not_found")


@router.get("/v1/models")
async def list_models(s: Server):
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                        "owned_by": "hotpath", "max_model_len": s.engine.max_model_len,
                                        "backend": s.backend.description}]}


@router.get("/v1/models/{name}")
async def get_model(name: str, s: Server):
    if name != s.model_name:
        raise _not_served(name, s.model_name)
    return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "hotpath"}


@router.post("/v1/completions", openapi_extra=COMPLETIONS_BODY, responses=COMPLETIONS_RESPONSES)
async def completions(request: Request, s: Server):
    deadline = None if s.request_timeout is None else time.monotonic() + s.request_timeout
    max_len = s.engine.max_model_len
    try:
        req = parse_completion(await request.body())
        if req.model and req.model != s.model_name:
            raise _not_served(req.model, s.model_name)
        max_tokens = req.max_tokens or 16
        capacity = s.engine.max_batch_size + s.engine.max_queue
        if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
                and len(req.prompt) > capacity:  # it could never be admitted whole: not worth a retry
            raise APIError(400, f"the request has {len(req.prompt)} prompts; this server holds at most {capacity} "
                                f"(--max-batch-size + --max-queue): send fewer per request", param="prompt")
        check_prompt_chars(req.prompt, max_tokens, max_len, s.max_chars_per_token)
        # off the event loop: a long prompt must not stall the other streams while it is tokenized
        prompts = await asyncio.to_thread(tokenize_prompts, req.prompt, s.backend.tokenizer)
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            if len(ids) + max_tokens > max_len:
                raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you "
                                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                                    f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                               param="max_tokens", code="context_length_exceeded")
    except APIError:
        s.metrics.outcome("completions", "invalid")
        raise
    top_k = req.top_k if req.top_k and req.top_k > 0 else None
    top_p = req.top_p if req.top_p is not None and req.top_p < 1 else None
    params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature or 0.0, top_k=top_k, top_p=top_p,
                            seed=req.seed)
    handles = _submit_all(s, prompts, params)
    texts = [TextStream(s.backend.tokenizer, req.stops, s.backend.eos_id) for _ in handles]
    run = Completion(handles, texts, s.model_name, sum(len(p) for p in prompts), s.metrics, deadline,
                     s.request_timeout)
    if req.stream:
        return run.stream(bool(req.stream_options and req.stream_options.include_usage))
    return await run.collect(request)


def _submit_all(s: ServerState, prompts: list[list[int]], params: SamplingParams) -> list[RequestHandle]:
    """All of a call's prompts join the engine, or none does (400 for a bad prompt, 503 when full or stopping)."""
    loop = asyncio.get_running_loop()
    handles: list[RequestHandle] = []
    try:
        for ids in prompts:
            handles.append(s.engine.submit(ids, params, loop))
    except (QueueFull, EngineStopped, ValueError) as e:
        for h in handles:
            h.cancel()
        if isinstance(e, ValueError):
            s.metrics.outcome("completions", "invalid")
            raise APIError(400, str(e), param="prompt") from e
        s.metrics.outcome("completions", "rejected")
        msg = (f"the server is busy: {e}; retry after {RETRY_AFTER_S} s" if isinstance(e, QueueFull)
               else "the server is shutting down and admits no new requests")
        raise APIError(503, msg, "server_overloaded" if isinstance(e, QueueFull) else "server_shutting_down",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from e
    return handles
