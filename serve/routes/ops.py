"""Operations: liveness and readiness probes (KServe v2 paths, which Kubernetes probes use too) and Prometheus
metrics. These stay open when the server has an API key (`auth.OPEN_PATHS`)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..metrics import CONTENT_TYPE
from .state import Server

router = APIRouter()


@router.get("/v2/health/live")
async def live():
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(s: Server):
    if not s.engine.accepting:  # draining after SIGTERM: load balancers stop sending
        return JSONResponse({"ready": False}, status_code=503)
    return {"ready": True}


@router.get("/metrics", response_class=PlainTextResponse)  # the schema says text/plain
async def prometheus(s: Server):
    return Response(s.metrics.render(), media_type=CONTENT_TYPE)
