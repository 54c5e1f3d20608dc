"""Error bodies: `/v1/*` answers with OpenAI's `{"error": {"message", "type", "param", "code"}}`, `/v2/*` with the
Open Inference Protocol's `{"error": "<message>"}`; routes raise `APIError` and the handlers here render it."""
from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

RETRY_AFTER_S = 1  # the Retry-After of every 503


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate from the request (legal in JSON's `\\ud800`) that reaches an
    error message or an echoed id cannot be encoded as UTF-8, and Starlette's JSONResponse would fail with a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(path: str, status: int, message: str, type_: str = "invalid_request_error",
                   param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    if path.startswith("/v2"):
        body: dict[str, Any] = {"error": message}
    else:
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return SafeJSONResponse(body, status_code=status, headers=headers)


def describe(errors: Sequence[Any]) -> str:
    """Pydantic validation errors -> one line naming the first three fields at fault."""
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def add_error_handlers(app: FastAPI) -> None:
    """APIError, FastAPI's validation errors and Starlette's (404, 405...) in the body format of the path's API."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(request.url.path, e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, 422, describe(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, e.status_code, str(e.detail),
                              "not_found_error" if e.status_code == 404 else "invalid_request_error")
