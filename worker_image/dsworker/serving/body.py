"""The request body, bounded, and the wait for a client that has gone."""

from __future__ import annotations

import logging

from fastapi import Request
from starlette.requests import ClientDisconnect

from dsworker.serving.protocol.errors import ApiError

log = logging.getLogger(__name__)

# Set in a request's scope by the server (http_server) when it cut the connection because the
# request had not arrived whole within requestReadTimeout.
READ_TIMED_OUT = "dsworker.read_timed_out"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything above `limit` without reading it all; a client
    that leaves meanwhile is a 499 (408 when the server cut it off for being too slow)."""
    too_big = ApiError(f"request body exceeds {limit} bytes", status=413, code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise client_gone(request, "before sending the whole body") from None
    return b"".join(chunks)


def client_gone(request: Request, when: str) -> ApiError:
    """What a request whose client has gone is counted as: 408 when the server cut it off for
    being too slow (http_server logs that), else 499, logged at info: not the server's fault."""
    if request.scope.get(READ_TIMED_OUT):
        return ApiError(
            "the request did not arrive whole within requestReadTimeout",
            status=408,
            code="request_timeout",
        )
    client = request.client.host if request.client else "?"
    log.info("client %s left %s %s", client, when, request.url.path)
    return ApiError("client closed the request", status=499, code="client_closed")


async def disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
