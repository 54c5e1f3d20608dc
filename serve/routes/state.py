"""What the routers share, kept on `app.state.server` by `serve.app.create_app` and read through `Server`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

from fastapi import Depends, Request

from ..backends.base import Backend
from ..engine import Engine
from ..metrics import Metrics


@dataclass(frozen=True)
class ServerState:
    backend: Backend
    engine: Engine  # owns the limits: max_batch_size, max_queue, max_model_len
    metrics: Metrics
    model_name: str  # the name clients use
    created: int  # Unix time the app was made (/v1/models' `created`)
    max_chars_per_token: int = 1  # the longest token in characters (schemas.check_prompt_chars)
    request_timeout: Optional[float] = None  # --request-timeout: seconds a request may take, None for no limit


async def server_state(request: Request) -> ServerState:  # async: FastAPI runs a plain def in a worker thread
    return request.app.state.server


Server = Annotated[ServerState, Depends(server_state)]  # a route parameter of this type gets the state
