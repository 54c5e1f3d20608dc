"""KServe v2 / Open Inference Protocol: server and model metadata, model readiness, and `infer` (input_ids and an
optional attention_mask, JSON or binary tensors in; the logits, JSON or binary, out).

Every malformed request is a 400 in the protocol's `{"error": "<message>"}`: the JSON's shape (inputs, outputs,
parameters), each tensor's shape, datatype and data length, integer token ids inside the vocabulary, a 0/1 attention
mask with a 1 in every row, and at most --max-batch-size rows of at most the context's tokens (the largest batch the
engine runs). Not finished within --request-timeout -> 408."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers

from common.version import hotpath_version

from ..engine import EngineStopped
from .errors import RETRY_AFTER_S, APIError, SafeJSONResponse
from .spec import INFER_BODY, INFER_RESPONSES, V2_ERRORS
from .state import Server, ServerState

router = APIRouter(responses=V2_ERRORS)

_NP = {"INT64": np.int64, "INT32": np.int32, "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8,
       "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "FP32": np.float32, "FP64": np.float64,
       "FP16": np.float16, "BOOL": np.bool_}


def _known(s: ServerState, name: str) -> None:
    if name != s.model_name:
        raise APIError(404, f"model {name!r} is not served here (try {s.model_name!r})")


@router.get("/v2")
async def server_metadata():
    return {"name": "hotpath", "version": hotpath_version(), "extensions": ["binary_tensor_data"]}


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(name: str, s: Server, version: Optional[str] = None):
    _known(s, name)
    return {"name": s.model_name, "versions": ["1"], "platform": f"hotpath_{s.backend.name}",
            "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                       {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1], "optional": True}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, s.backend.vocab_size]}]}


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(name: str, s: Server, version: Optional[str] = None):
    _known(s, name)
    if not s.engine.accepting:
        return JSONResponse({"name": name, "ready": False}, status_code=503)
    return {"name": name, "ready": True}


@router.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY, responses=INFER_RESPONSES)
@router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY, responses=INFER_RESPONSES)
async def infer(name: str, request: Request, s: Server, version: Optional[str] = None):
    deadline = None if s.request_timeout is None else time.monotonic() + s.request_timeout
    try:
        _known(s, name)
        req, tensors = parse_infer(await request.body(), request.headers)
        ids, mask = _check_inputs(tensors, s.engine.max_model_len, s.backend.vocab_size, s.engine.max_batch_size)
        wanted = [o.get("name") for o in req.get("outputs") or []]
        if any(w != "logits" for w in wanted):
            unknown = [w for w in wanted if w != "logits"][0]
            raise APIError(400, f"unknown output {unknown!r} (this model has logits)")
    except APIError:
        s.metrics.outcome("infer", "invalid")
        raise
    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask_t = torch.from_numpy(mask.astype(np.int64))
    pos_t = (mask_t.cumsum(-1) - 1).clamp(min=0)
    backend = s.backend
    try:  # on the engine's thread: nothing else touches the backend concurrently
        fut = s.engine.call(lambda: backend.forward(ids_t, mask_t, pos_t, None)[0])
    except EngineStopped as e:
        s.metrics.outcome("infer", "rejected")
        raise APIError(503, "the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)}) from e
    try:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        logits = (await asyncio.wait_for(asyncio.wrap_future(fut), remaining)).float().cpu().numpy()
    except asyncio.TimeoutError:
        fut.cancel()  # still queued: the engine skips it; already running: its result is dropped
        s.metrics.outcome("infer", "timeout")
        raise APIError(408, f"the request did not finish within the server's --request-timeout of "
                            f"{s.request_timeout:g} s") from None
    except Exception as e:  # any model failure becomes this request's 500, not the server's
        s.metrics.outcome("infer", "error")
        raise APIError(500, f"inference failed: {type(e).__name__}: {e}") from e
    s.metrics.outcome("infer", "success")
    return _infer_response(req, s.model_name, logits)


def _check_inputs(tensors: dict[str, np.ndarray], max_len: int, vocab: int,
                  max_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) as the model takes them, or APIError 400 saying what is wrong."""
    ids = tensors.get("input_ids")
    if ids is None:
        raise APIError(400, "the request needs an input named input_ids (INT64, shape [batch, tokens])")
    if ids.dtype.kind not in "iu":  # float ids (NaN, 1.5) would be cast to garbage indices
        raise APIError(400, f"input_ids must be an integer tensor (INT64), got {ids.dtype}")
    if ids.ndim != 2 or ids.size == 0:
        raise APIError(400, f"input_ids must have shape [batch, tokens], got {list(ids.shape)}")
    if ids.shape[1] > max_len:
        raise APIError(400, f"input_ids has {ids.shape[1]} tokens, over the maximum context length of {max_len}")
    if ids.shape[0] > max_batch:
        raise APIError(400, f"input_ids has a batch of {ids.shape[0]}, over the server's --max-batch-size of "
                            f"{max_batch} (split the request)")
    if ids.min() < 0 or ids.max() >= vocab:
        raise APIError(400, f"input_ids holds ids outside the vocabulary [0, {vocab})")
    mask = tensors.get("attention_mask")
    if mask is None:
        mask = np.ones_like(ids)
    elif mask.shape != ids.shape:
        raise APIError(400, f"attention_mask shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
    elif mask.dtype.kind not in "iub" or not np.isin(mask, (0, 1)).all() or not mask.any(axis=1).all():
        # other values would make position ids past the model's table; an all-0 row attends to nothing
        raise APIError(400, "attention_mask must hold 0 and 1 only, with at least one 1 in every row")
    return ids, mask


def _infer_response(req: dict[str, Any], model_name: str, logits: np.ndarray) -> Response:
    """The logits as JSON data, or as binary after the JSON header when the request asks for binary output."""
    out_params = {o.get("name"): (o.get("parameters") or {}) for o in req.get("outputs") or []}
    binary = out_params.get("logits", {}).get("binary_data",
                                               (req.get("parameters") or {}).get("binary_data_output", False))
    head: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": []}
    if req.get("id") is not None:
        head["id"] = req["id"]
    out: dict[str, Any] = {"name": "logits", "datatype": "FP32", "shape": list(logits.shape)}
    if binary:
        raw = logits.astype("<f4").tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
        head["outputs"].append(out)
        js = json.dumps(head).encode()
        return Response(js + raw, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(js))})
    out["data"] = logits.reshape(-1).tolist()
    head["outputs"].append(out)
    return SafeJSONResponse(head)  # the echoed id may hold a lone surrogate


def parse_infer(body: bytes, headers: Headers) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Open Inference Protocol request (JSON, or JSON + binary tensors) -> (request dict, {name: array})."""
    header_len = headers.get("inference-header-content-length")
    try:
        if header_len is not None:
            n = int(header_len)
            if not 0 <= n <= len(body):
                raise ValueError(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
            req, blob = json.loads(body[:n]), body[n:]
        else:
            req, blob = json.loads(body), b""
    except (ValueError, RecursionError) as e:  # ValueError covers UnicodeDecodeError and JSONDecodeError
        raise APIError(400, f"the body is not a valid inference request ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise APIError(400, "the request needs an 'inputs' list")
    _check_objects(req)
    tensors, offset = {}, 0
    for spec in req["inputs"]:
        name, dtype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list) \
                or not all(type(d) is int and d >= 0 for d in shape):
            raise APIError(400, "every input needs a name, a datatype and a shape (a list of non-negative integers)")
        if dtype not in _NP:
            raise APIError(400, f"input {name}: datatype {dtype} is not supported (use INT64)")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        try:
            if size is not None:
                if type(size) is not int or not 0 <= size <= len(blob) - offset:
                    raise ValueError(f"binary_data_size {size} does not fit the {len(blob) - offset} bytes left")
                arr = np.frombuffer(blob[offset:offset + size], dtype=np.dtype(_NP[dtype]).newbyteorder("<"))
                offset += size
            else:
                arr = np.asarray(spec.get("data"), dtype=_NP[dtype])
            arr = arr.reshape(shape)
        except (ValueError, TypeError, OverflowError) as e:  # OverflowError: 1e400 or 10**30 as INT64
            raise APIError(400, f"input {name}: data does not match shape {shape} and datatype {dtype} ({e})") from e
        tensors[name] = arr
    return req, tensors


def _check_objects(req: dict[str, Any]) -> None:
    """The protocol's objects have the JSON types the code above and `_infer_response` read them as."""
    def is_obj(x: Any) -> bool:
        return isinstance(x, dict) and isinstance(x.get("parameters") or {}, dict)

    outputs = req.get("outputs") or []
    if not all(is_obj(spec) for spec in req["inputs"]):
        raise APIError(400, "every input must be an object, its parameters an object")
    if not isinstance(outputs, list) or not all(is_obj(o) for o in outputs):
        raise APIError(400, "outputs must be a list of objects, their parameters objects")
    if not isinstance(req.get("parameters") or {}, dict):
        raise APIError(400, "the request's parameters must be an object")
