"""Errors as OpenAI's JSON: the client's mistakes (ApiError) and what FastAPI itself refuses
(unknown paths, methods), never FastAPI's default shapes."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsworker.engine.metrics import Metrics
from dsworker.serving.protocol.errors import ApiError


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Answer FastAPI's own errors in OpenAI's shape, counted under endpoint "other", and
    ApiErrors raised outside an endpoint's frame (a dependency, a GET) under their route."""

    async def api_exc(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        route = getattr(request.scope.get("route"), "path", "other")
        metrics.requests.labels(route, str(exc.status)).inc()
        return error_response(exc)

    async def http_exc(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        metrics.requests.labels("other", str(exc.status_code)).inc()
        err = ApiError(str(exc.detail), status=exc.status_code)
        if exc.status_code == 404:
            err.code = "not_found"
        return error_response(err)

    async def validation_exc(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(str(exc)))

    app.add_exception_handler(ApiError, api_exc)
    app.add_exception_handler(StarletteHTTPException, http_exc)
    app.add_exception_handler(RequestValidationError, validation_exc)
