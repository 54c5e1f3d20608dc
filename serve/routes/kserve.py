"""KServe v2 / Open Inference Protocol: server and model metadata, model readiness, and `infer` (input_ids and an
optional attention_mask, JSON or binary tensors in; the logits, JSON or binary, out)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers

from common.version import hotpath_version

from ..engine import EngineStopped
from .errors import RETRY_AFTER_S, APIError
from .state import Server, ServerState

router = APIRouter()

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


@router.post("/v2/models/{name}/infer")
@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, s: Server, version: Optional[str] = None):
    try:
        _known(s, name)
        req, tensors = parse_infer(await request.body(), request.headers)
        ids, mask = _check_inputs(tensors, s.engine.max_model_len, s.backend.vocab_size)
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
        logits = (await asyncio.wrap_future(fut)).float().cpu().numpy()
    except Exception as e:  # any model failure becomes this request's 500, not the server's
        s.metrics.outcome("infer", "error")
        raise APIError(500, f"inference failed: {type(e).__name__}: {e}") from e
    s.metrics.outcome("infer", "success")
    return _infer_response(req, s.model_name, logits)


def _check_inputs(tensors: dict[str, np.ndarray], max_len: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) as the model takes them, or APIError 400 saying what is wrong."""
    ids = tensors.get("input_ids")
    if ids is None:
        raise APIError(400, "the request needs an input named input_ids (INT64, shape [batch, tokens])")
    if ids.ndim != 2 or ids.size == 0:
        raise APIError(400, f"input_ids must have shape [batch, tokens], got {list(ids.shape)}")
    if ids.shape[1] > max_len:
        raise APIError(400, f"input_ids has {ids.shape[1]} tokens, over the maximum context length of {max_len}")
    if ids.min() < 0 or ids.max() >= vocab:
        raise APIError(400, f"input_ids holds ids outside the vocabulary [0, {vocab})")
    mask = tensors.get("attention_mask")
    if mask is None:
        mask = np.ones_like(ids)
    elif mask.shape != ids.shape:
        raise APIError(400, f"attention_mask shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
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
    return JSONResponse(head)


def parse_infer(body: bytes, headers: Headers) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
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
