"""`--api-key`: every request but the probes and /metrics needs `Authorization: Bearer <key>`, or gets 401."""
from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from ..metrics import Metrics
from .errors import error_response

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/metrics")  # probes and scraping need no key


class APIKeyMiddleware:
    """Pure ASGI (streams and disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            self.metrics.outcome(endpoint_label(scope["path"]), "unauthorized")
            what = "no Authorization header" if not auth else "a wrong API key"
            resp = error_response(scope["path"], 401, f"the request has {what} (send Authorization: Bearer <key>)",
                                  "authentication_error", code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def endpoint_label(path: str) -> str:
    """The `endpoint` label of hotpath_requests_total for a path."""
    if path.startswith("/v1/completions"):
        return "completions"
    if path.endswith("/infer"):
        return "infer"
    return "other"
