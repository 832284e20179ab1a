"""Requests to the engine and its answers back: the engine thread's sinks feed an asyncio queue
on the server's loop; a failing choice, or a client that leaves, aborts every choice."""

from __future__ import annotations

import asyncio
from typing import NamedTuple

from fastapi import Request

from dsworker.engine.requests import GenRequest, Output, Sink, TokenLogprob
from dsworker.serving.body import client_gone, disconnected
from dsworker.serving.protocol.errors import ApiError
from dsworker.serving.state import Engine


class EngineStream:
    """Bridge from the engine thread's sinks to one asyncio queue on the server's loop: each
    choice's sink tags its Outputs with the choice's index."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self._loop = loop

    def sink(self, index: int) -> Sink:
        def put(out: Output) -> None:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        return put


class Answer(NamedTuple):
    """One choice's whole answer, as the non-streaming endpoints return it."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...]  # when asked: one per token id
    prompt_logprobs: tuple[TokenLogprob, ...]  # echo's, from the first output


def submit(engine: Engine, gen: GenRequest, sink: Sink) -> int:
    """The sequence id of `gen` in the engine; a refusal (the engine has failed) is a 500."""
    try:
        return engine.submit(gen, sink)
    except RuntimeError as exc:
        raise ApiError(str(exc), status=500, type="server_error") from None


async def collect(engine: Engine, gen: GenRequest) -> Answer:
    """The whole answer of one choice; cancelled, it aborts the sequence."""
    stream = EngineStream(asyncio.get_running_loop())
    seq_id = submit(engine, gen, stream.sink(0))
    outs: list[Output] = []
    try:
        while True:
            _, out = await stream.queue.get()
            if out.error:
                raise ApiError(out.error, status=500, type="server_error")
            outs.append(out)
            if out.finish_reason is not None:
                return Answer(
                    "".join(o.text for o in outs),
                    [t for o in outs for t in o.token_ids],
                    out.finish_reason,
                    tuple(e for o in outs for e in o.logprobs),
                    outs[0].prompt_logprobs,
                )
    except (asyncio.CancelledError, ApiError):
        engine.abort(seq_id)
        raise


async def collect_all(engine: Engine, gens: list[GenRequest], request: Request) -> list[Answer]:
    """Every choice's answer; one failing, or the client leaving, cancels (and so aborts)
    them all: a gone client's sequences must not keep their slots."""
    tasks = [asyncio.ensure_future(collect(engine, g)) for g in gens]
    answers = asyncio.gather(*tasks)
    # Cancelled children leave their CancelledError on the gather, which nothing awaits once
    # the client has gone: retrieve it, or asyncio logs "exception was never retrieved".
    answers.add_done_callback(_retrieve)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait((answers, gone), return_when=asyncio.FIRST_COMPLETED)
        if not answers.done():
            raise client_gone(request, "before its answer was complete")
        return list(answers.result())
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    finally:
        gone.cancel()


def _retrieve(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()
