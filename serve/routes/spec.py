"""What /openapi.json says about the bodies routes parse by hand and the errors they answer with.

The completion and infer routes read their bodies themselves (400 for bad JSON, 422 for wrong types, in their own
API's error format), so FastAPI cannot infer a request schema from their signatures; these dicts describe them for
the route decorators (`openapi_extra=`, `responses=`). Clients, and the schema fuzzer in tests/serve/test_fuzz.py,
read the schema: an undescribed body is never generated, an undeclared status code or content type is a failure.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel

from .schemas import CompletionRequest


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class V2Error(BaseModel):
    error: str


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Optional[str] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class InferTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: Optional[list[Any]] = None
    parameters: Optional[dict[str, Any]] = None


class InferOutputRequest(BaseModel):
    name: str
    parameters: Optional[dict[str, Any]] = None


class InferRequest(BaseModel):
    id: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    inputs: list[InferTensor]
    outputs: Optional[list[InferOutputRequest]] = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: Optional[str] = None
    outputs: list[InferTensor]


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` inlined: in an OpenAPI document `#/...` refers to the document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline(model)}}}}


# every other status of an API's routes (400, 404, 413, 422, 499, 503...) answers in that API's error format
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {"default": {"model": OpenAIError, "description": "an error"}}
V2_ERRORS: dict[int | str, dict[str, Any]] = {"default": {"model": V2Error, "description": "an error"}}

COMPLETIONS_BODY = _body(CompletionRequest)
COMPLETIONS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": CompletionResponse, "description": "the completion; with stream: true, server-sent events of "
                                                      "such chunks ending in `data: [DONE]`",
          "content": {"text/event-stream": {"schema": {  # one event: its `data` is a JSON chunk or [DONE]
              "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}}}}
INFER_BODY = _body(InferRequest)
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": InferResponse, "description": "the logits; binary after the JSON header when asked for",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
