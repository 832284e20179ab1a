"""The request body, bounded, and the wait for a client that has gone."""

from __future__ import annotations

from fastapi import Request

from dsworker.serving.protocol.errors import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything above `limit` without reading it all."""
    too_big = ApiError(f"request body exceeds {limit} bytes", status=413, code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
