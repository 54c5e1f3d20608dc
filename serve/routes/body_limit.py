"""`--max-request-bytes`: a body over the limit gets 413 before it is read whole or parsed.

Pure ASGI, outermost of the app's own middleware: a Content-Length over the limit is answered at once, without
reading a byte of the body; a chunked body (no Content-Length) is counted as the route reads it through `receive`,
and the read stops at the limit. The 413 carries `Connection: close`, so the server does not go on reading (and
discarding) the rest of a body it has refused."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import Metrics
from .auth import endpoint_label
from .errors import error_response

DEFAULT_MAX_REQUEST_BYTES = 1 << 20


class BodyTooLarge(Exception):
    """Raised inside `receive` when a chunked body passes the limit; the middleware turns it into the 413."""


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None  # the HTTP server has already refused a malformed Content-Length
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(scope, receive, send)

        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:  # cannot happen with today's routes (they read the body before answering)
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.outcome(endpoint_label(scope["path"]), "invalid")
        resp = error_response(scope["path"], 413, f"the request body is over the server's limit of {self.max_bytes}"
                                                   f" bytes (send less, or start the server with a larger "
                                                   f"--max-request-bytes)", code="request_too_large",
                              headers={"Connection": "close"})
        await resp(scope, receive, send)
