"""Every POST endpoint's frame: the ready check, the bounded body, the status count, and any
failure answered in OpenAI's shape (a bug too, as a counted 500)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from dsworker.serving.body import read_body
from dsworker.serving.errors import error_response
from dsworker.serving.protocol.errors import ApiError
from dsworker.serving.state import ServerState, server_state

log = logging.getLogger(__name__)

# What an endpoint does with the request once its body is read.
Handler = Callable[[ServerState, bytes, Request], Awaitable[Response]]


async def run_endpoint(request: Request, endpoint: str, handler: Handler) -> Response:
    """`handler`'s response, or the error it raised as OpenAI's JSON; counted either way."""
    state = server_state(request)
    m = state.metrics
    try:
        state.serving()
        raw = await read_body(request, state.config.maxRequestBytes)
        resp = await handler(state, raw, request)
    except ApiError as exc:
        m.requests.labels(endpoint, str(exc.status)).inc()
        return error_response(exc)
    except Exception:  # a bug, not the client's fault: still OpenAI's shape, still counted
        log.exception("%s failed", endpoint)
        m.requests.labels(endpoint, "500").inc()
        return error_response(ApiError("internal server error", status=500, type="server_error"))
    m.requests.labels(endpoint, str(resp.status_code)).inc()
    return resp
