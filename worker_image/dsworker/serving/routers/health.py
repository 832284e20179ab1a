"""GET /health (the readiness probe: 503 until loaded and warmed up) and GET /metrics; both
stay open without an API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dsworker.serving.state import server_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = server_state(request)
    code = 200 if state.ready else 503
    return JSONResponse({"status": "ok" if state.ready else state.status}, status_code=code)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = server_state(request).metrics
    return Response(m.render(), media_type=m.content_type)
