"""Rank 0's OpenAI-compatible HTTP API (FastAPI), a thin shell over the engine loop.

Handlers only validate, tokenize, submit and stream; all scheduling is in the engine thread.
Every client mistake is answered as OpenAI's error JSON (4xx), never as a FastAPI default shape.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsworker import openai_schema as oa
from dsworker.chat_template import ChatTemplateError, render_chat
from dsworker.engine_config import EngineConfig
from dsworker.engine_loop import GenRequest, Output, Sink
from dsworker.metrics import Metrics
from dsworker.openai_logprobs import chat_logprobs, completion_logprobs
from dsworker.sampling import TokenLogprob

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class Engine(Protocol):
    def submit(self, req: GenRequest, sink: Sink) -> int: ...
    def abort(self, seq_id: int) -> None: ...


class Tokenizer(Protocol):
    bos_token: str
    eos_token: str
    eos_token_ids: frozenset[int]
    chat_template: str | None
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class ServerState:
    """What the handlers share; `engine` is set and `ready` flipped once loading and warm-up end."""

    config: EngineConfig
    metrics: Metrics = field(default_factory=Metrics)
    tokenizer: Tokenizer | None = None
    engine: Engine | None = None
    ready: bool = False
    status: str = "starting"
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def limits(self) -> oa.Limits:
        assert self.tokenizer is not None
        c = self.config
        return oa.Limits(
            c.maxInputTokenLen, c.maxSeqLen, c.maxNewTokens, c.truncation, self.tokenizer.vocab_size
        )


def _error(exc: oa.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything above `limit` without reading it all."""
    too_big = oa.ApiError(
        f"request body exceeds {limit} bytes", status=413, code="request_too_large"
    )
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


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


class _Stream:
    """Bridge from the engine thread's sink to an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self._loop = loop

    def sink(self, out: Output) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, out)


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app; tests drive it with a fake engine, `dsworker serve` with the real one."""
    app = FastAPI(title="dsworker", docs_url=None, redoc_url=None, openapi_url=None)
    m = state.metrics

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        m.requests.labels("other", str(exc.status_code)).inc()
        err = oa.ApiError(str(exc.detail), status=exc.status_code)
        if exc.status_code == 404:
            err.code = "not_found"
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_exc(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(oa.ApiError(str(exc)))

    @app.get("/health")
    async def health() -> JSONResponse:
        code = 200 if state.ready else 503
        return JSONResponse({"status": "ok" if state.ready else state.status}, status_code=code)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(m.render(), media_type=m.content_type)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": state.config.modelName,
                        "object": "model",
                        "created": state.created,
                        "owned_by": "dsworker",
                        "max_model_len": state.config.maxSeqLen,
                    }
                ],
            }
        )

    async def handle(
        request: Request,
        endpoint: str,
        run: Callable[[bytes], Any],
    ) -> Response:
        try:
            if not state.ready or state.engine is None or state.tokenizer is None:
                raise oa.ApiError(
                    "the model is still loading; retry when /health answers 200",
                    status=503,
                    type="service_unavailable",
                )
            raw = await _read_body(request, state.config.maxRequestBytes)
            resp = await run(raw)
        except oa.ApiError as exc:
            m.requests.labels(endpoint, str(exc.status)).inc()
            return _error(exc)
        m.requests.labels(endpoint, str(resp.status_code)).inc()
        return resp

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "/v1/completions", _completions)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await handle(request, "/v1/chat/completions", _chat)

    def _check_model(name: str | None) -> None:
        if name not in (None, "", state.config.modelName):
            raise oa.ApiError(
                f"model {name!r} is not served here; use {state.config.modelName!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    def _gen_request(body: oa._Common, prompt: list[int], default_max: int) -> GenRequest:
        assert state.tokenizer is not None
        limits = state.limits
        prompt = oa.check_prompt_ids(prompt, limits)
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        max_tokens = oa.resolve_max_tokens(requested, default_max, len(prompt), limits)
        return GenRequest(
            prompt=prompt,
            params=body.sampling(),
            max_tokens=max_tokens,
            stop=body.stop_list,
            stop_token_ids=state.tokenizer.eos_token_ids,
            ignore_eos=body.ignore_eos,
            logprobs=body.logprob_count(),
        )

    def _token_text(token: int) -> str:
        assert state.tokenizer is not None
        return state.tokenizer.decode([token], skip_special_tokens=False)

    async def _completions(raw: bytes) -> Response:
        assert state.tokenizer is not None
        body = oa.parse_request(oa.CompletionRequest, raw)
        _check_model(body.model)
        prompt = body.single_prompt()
        ids = state.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        gen = _gen_request(body, ids, COMPLETION_DEFAULT_MAX_TOKENS)
        rid = oa.new_id("cmpl")
        model = state.config.modelName
        want_ids = body.return_token_ids
        want_lps = gen.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            offset = 0

            def chunk(out: Output) -> list[dict[str, Any]]:
                nonlocal offset
                if not (out.text or out.finish_reason or want_ids or want_lps):
                    return []  # a token that completes no character yet
                ids = out.token_ids if want_ids else None
                lps = None
                if want_lps:
                    lps = completion_logprobs(out.logprobs, _token_text, offset)
                    offset += sum(len(t) for t in lps["tokens"])
                return [oa.completion_chunk(rid, model, out.text, out.finish_reason, ids, lps)]

            def usage_chunk(n: int) -> dict[str, Any]:
                return oa.usage_chunk(rid, "text_completion", model, len(gen.prompt), n)

            return _streaming(gen, chunk, usage_chunk if include_usage else None)
        text, ids_out, reason, entries = await _collect(gen)
        return JSONResponse(
            oa.completion_body(
                rid,
                model,
                text,
                reason,
                len(gen.prompt),
                len(ids_out),
                ids_out if want_ids else None,
                completion_logprobs(entries, _token_text) if want_lps else None,
            )
        )

    async def _chat(raw: bytes) -> Response:
        tok = state.tokenizer
        assert tok is not None
        body = oa.parse_request(oa.ChatCompletionRequest, raw)
        _check_model(body.model)
        try:
            text = render_chat(
                body.template_messages(),
                tok.chat_template,
                bos_token=tok.bos_token,
                eos_token=tok.eos_token,
                add_generation_prompt=True,
            )
        except ChatTemplateError as exc:
            raise oa.ApiError(str(exc), param="messages") from None
        gen = _gen_request(body, tok.encode(text, add_bos=False), state.config.maxNewTokens)
        rid = oa.new_id("chatcmpl")
        model = state.config.modelName
        want_ids = body.return_token_ids
        want_lps = gen.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            first = True

            def chunk(out: Output) -> list[dict[str, Any]]:
                nonlocal first
                ids = out.token_ids if want_ids else None
                lps = chat_logprobs(out.logprobs, _token_text) if want_lps else None
                chunks = []
                if first:
                    first = False
                    chunks.append(
                        oa.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None, None)
                    )
                if out.text or out.finish_reason or want_ids or want_lps:
                    delta = {"content": out.text} if out.text else {}
                    chunks.append(oa.chat_chunk(rid, model, delta, out.finish_reason, ids, lps))
                return chunks

            def usage_chunk(n: int) -> dict[str, Any]:
                return oa.usage_chunk(rid, "chat.completion.chunk", model, len(gen.prompt), n)

            return _streaming(gen, chunk, usage_chunk if include_usage else None)
        text, ids_out, reason, entries = await _collect(gen)
        return JSONResponse(
            oa.chat_body(
                rid,
                model,
                text,
                reason,
                len(gen.prompt),
                len(ids_out),
                ids_out if want_ids else None,
                chat_logprobs(entries, _token_text) if want_lps else None,
            )
        )

    def _submit(gen: GenRequest) -> tuple[int, _Stream]:
        assert state.engine is not None
        stream = _Stream(asyncio.get_running_loop())
        try:
            seq_id = state.engine.submit(gen, stream.sink)
        except RuntimeError as exc:
            raise oa.ApiError(str(exc), status=500, type="server_error") from None
        return seq_id, stream

    async def _collect(
        gen: GenRequest,
    ) -> tuple[str, list[int], str | None, list[TokenLogprob]]:
        """The whole answer: text, token ids, finish reason and (when asked) token logprobs."""
        assert state.engine is not None
        seq_id, stream = _submit(gen)
        parts: list[str] = []
        ids: list[int] = []
        entries: list[TokenLogprob] = []
        try:
            while True:
                out = await stream.queue.get()
                if out.error:
                    raise oa.ApiError(out.error, status=500, type="server_error")
                parts.append(out.text)
                ids += out.token_ids
                entries += out.logprobs
                if out.finish_reason is not None:
                    return "".join(parts), ids, out.finish_reason, entries
        except asyncio.CancelledError:
            state.engine.abort(seq_id)
            raise

    def _streaming(
        gen: GenRequest,
        chunk: Callable[[Output], list[dict[str, Any]]],
        usage_chunk: Callable[[int], dict[str, Any]] | None,
    ) -> StreamingResponse:
        seq_id, stream = _submit(gen)
        engine = state.engine
        assert engine is not None

        async def events() -> AsyncIterator[bytes]:
            n = 0
            done = False
            try:
                while True:
                    out = await stream.queue.get()
                    if out.error:
                        err = oa.ApiError(out.error, status=500, type="server_error")
                        yield _sse(err.body())
                        done = True
                        return
                    n += len(out.token_ids)
                    for c in chunk(out):
                        yield _sse(c)
                    if out.finish_reason is not None:
                        done = True
                        break
                if usage_chunk is not None:
                    yield _sse(usage_chunk(n))
                yield _sse("[DONE]")
            finally:
                if not done:
                    engine.abort(seq_id)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app
