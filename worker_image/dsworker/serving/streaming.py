"""Server-sent events: every choice's chunks as its tokens come, an optional usage chunk, then
[DONE]; an engine failure is sent as an error event, and a client that leaves aborts the rest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from dsworker.engine.requests import GenRequest, Output
from dsworker.serving.dispatch import EngineStream, submit
from dsworker.serving.protocol.common import CommonRequest
from dsworker.serving.protocol.errors import ApiError
from dsworker.serving.protocol.responses import Reply
from dsworker.serving.state import Engine

# A choice's Output -> the chunk bodies to send for it (none while no character is complete).
Chunker = Callable[[int, Output], list[dict[str, Any]]]


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def usage_prompt_tokens(body: CommonRequest, prompt_tokens: int) -> int | None:
    """The prompt tokens a stream's final usage chunk reports; None: no usage chunk."""
    wanted = body.stream_options and body.stream_options.include_usage
    return prompt_tokens if wanted else None


def stream_response(
    engine: Engine,
    gens: list[GenRequest],
    chunk: Chunker,
    reply: Reply,
    usage_prompt: int | None,
) -> StreamingResponse:
    """Submit every choice now (a refusal is still an error response), then stream them."""
    stream = EngineStream(asyncio.get_running_loop())
    seq_ids: list[int] = []
    try:
        for index, gen in enumerate(gens):
            seq_ids.append(submit(engine, gen, stream.sink(index)))
    except ApiError:
        for seq_id in seq_ids:
            engine.abort(seq_id)
        raise
    return StreamingResponse(
        _events(engine, stream, seq_ids, chunk, reply, usage_prompt),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    engine: Engine,
    stream: EngineStream,
    seq_ids: list[int],
    chunk: Chunker,
    reply: Reply,
    usage_prompt: int | None,
) -> AsyncIterator[bytes]:
    used = 0
    running = set(range(len(seq_ids)))
    try:
        while running:
            index, out = await stream.queue.get()
            if out.error:
                yield sse(ApiError(out.error, status=500, type="server_error").body())
                yield sse("[DONE]")
                return
            used += len(out.token_ids)
            for c in chunk(index, out):
                yield sse(c)
            if out.finish_reason is not None:
                running.discard(index)
        if usage_prompt is not None:
            yield sse(reply.usage_chunk(usage_prompt, used))
        yield sse("[DONE]")
    finally:
        for index in running:
            engine.abort(seq_ids[index])
