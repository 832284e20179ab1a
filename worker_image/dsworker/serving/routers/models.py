"""GET /v1/models and /v1/models/{id}: the one served model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dsworker.serving.protocol.errors import ApiError
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


# :path, since model ids may hold slashes ("deepseek-ai/DeepSeek-R1")
@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> JSONResponse:
    state = server_state(request)
    if model_id != state.config.modelName:
        raise ApiError(
            f"the model {model_id!r} does not exist; this server serves {state.config.modelName!r}",
            status=404,
            param="model",
            code="model_not_found",
        )
    return JSONResponse(model_object(state))
