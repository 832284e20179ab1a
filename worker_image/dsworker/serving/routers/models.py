"""GET /v1/models: the one served model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dsworker.serving.state import ServerState, server_state

router = APIRouter()


def model_object(state: ServerState) -> dict[str, Any]:
    """OpenAI's model object, with vLLM's max_model_len."""
    return {
        "id": state.config.modelName,
        "object": "model",
        "created": state.created,
        "owned_by": "dsworker",
        "max_model_len": state.config.maxSeqLen,
    }


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [model_object(server_state(request))]})
