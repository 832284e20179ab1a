"""Rank 0's OpenAI-compatible HTTP API (FastAPI), a thin shell over the engine loop.

Handlers only validate, tokenize, submit and stream; all scheduling is in the engine thread.
Every client mistake is answered as OpenAI's error JSON (4xx), never as a FastAPI default shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsworker.chat.assistant_message import ChatOutput
from dsworker.chat.grammar_spec import GrammarError, GrammarSpec
from dsworker.chat.template import ChatTemplateError, render_chat
from dsworker.contract.engine_config import EngineConfig
from dsworker.engine.metrics import Metrics
from dsworker.engine.requests import GenRequest, Output, Sink, TokenLogprob
from dsworker.serving import protocol as oa
from dsworker.serving.logprobs import chat_logprobs, completion_logprobs

if TYPE_CHECKING:
    from dsworker.chat.grammars import Grammar

log = logging.getLogger("dsworker.serving.app")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Grammars compile on threads of their own, a few at a time, so that a costly schema holds up
# neither the event loop nor tokenization; a request whose grammar takes longer gets a 400.
GRAMMAR_THREADS = 2
GRAMMAR_TIMEOUT_S = 30.0


class Engine(Protocol):
    def submit(self, req: GenRequest, sink: Sink) -> int: ...
    def abort(self, seq_id: int) -> None: ...


class Tokenizer(Protocol):
    bos_token: str
    eos_token: str
    eos_token_ids: frozenset[int]
    special_ids: frozenset[int]
    chat_template: str | None
    vocab_size: int
    fim_tokens: tuple[str, ...] | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def token_bytes(self, token: int) -> bytes: ...


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
    # Grammar compiles running now, at most GRAMMAR_THREADS: one slot each, freed when the
    # compile ends (a timed-out one keeps its slot until then), so none waits in a queue.
    grammar_slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(GRAMMAR_THREADS)
    )

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


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


class _Stream:
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


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app; tests drive it with a fake engine, `dsworker serve` with the real one."""
    app = FastAPI(title="dsworker", docs_url=None, redoc_url=None, openapi_url=None)
    m = state.metrics
    grammar_threads = ThreadPoolExecutor(GRAMMAR_THREADS, thread_name_prefix="grammar")

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
        run: Callable[[bytes, Request], Any],
    ) -> Response:
        try:
            if not state.ready or state.engine is None or state.tokenizer is None:
                raise oa.ApiError(
                    "the model is still loading; retry when /health answers 200",
                    status=503,
                    type="service_unavailable",
                )
            raw = await _read_body(request, state.config.maxRequestBytes)
            resp = await run(raw, request)
        except oa.ApiError as exc:
            m.requests.labels(endpoint, str(exc.status)).inc()
            return _error(exc)
        except Exception:  # a bug, not the client's fault: still OpenAI's shape, still counted
            log.exception("%s failed", endpoint)
            m.requests.labels(endpoint, "500").inc()
            return _error(oa.ApiError("internal server error", status=500, type="server_error"))
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

    def _gen_requests(
        body: oa._Common, prompt: list[int], default_max: int, grammar: Grammar | None = None
    ) -> list[GenRequest]:
        """One engine request per choice (n); a seeded request's choice i is seeded seed + i."""
        assert state.tokenizer is not None
        limits = state.limits
        prompt = oa.check_prompt_ids(prompt, limits)
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        params = body.sampling()
        outside = [t for t, _ in params.logit_bias if t >= limits.vocab_size]
        if outside:
            raise oa.ApiError(
                f"logit_bias tokens {outside[:5]} are outside the vocabulary "
                f"[0, {limits.vocab_size})",
                param="logit_bias",
            )
        # ignore_eos lets EOS through, not the request's own stop tokens
        stops = frozenset(body.stop_token_ids) | (
            frozenset() if body.ignore_eos else state.tokenizer.eos_token_ids
        )
        if body.min_tokens:
            params = dataclasses.replace(params, min_tokens=body.min_tokens, stops=stops)
        gen = GenRequest(
            prompt=prompt,
            params=params,
            max_tokens=oa.resolve_max_tokens(requested, default_max, len(prompt), limits),
            stop=body.stop_list,
            stop_token_ids=stops,
            logprobs=body.logprob_count(),
            prompt_logprobs=body.prompt_logprob_count(),
            grammar=grammar,
        )
        if params.seed is None:
            return [gen] * body.n
        return [
            dataclasses.replace(gen, params=dataclasses.replace(params, seed=params.seed + i))
            for i in range(body.n)
        ]

    def _fill_in_the_middle(prompt: str | list[int], suffix: str) -> str:
        """DeepSeek's FIM prompt: the model writes what goes between `prompt` and `suffix`."""
        assert state.tokenizer is not None
        fim = state.tokenizer.fim_tokens
        if fim is None:
            raise oa.ApiError(
                "suffix needs a model whose tokenizer has DeepSeek's fill-in-the-middle tokens "
                "(<｜fim▁begin｜>, <｜fim▁hole｜>, <｜fim▁end｜>); this one has none",
                param="suffix",
            )
        if not isinstance(prompt, str):
            raise oa.ApiError("suffix needs a text prompt, not token ids", param="suffix")
        begin, hole, end = fim
        return f"{begin}{prompt}{hole}{suffix}{end}"

    async def _grammar(spec: GrammarSpec | None) -> Grammar | None:
        """The compiled grammar of `spec` (guided decoding): from the cache at once, else
        compiled on a free grammar thread (503 when every one is busy compiling)."""
        if spec is None:
            return None
        from dsworker.chat.grammars import built_grammars, grammars_for  # loaded at start-up

        assert state.tokenizer is not None
        built = built_grammars(state.tokenizer)
        hit = built.cached(spec) if built is not None else None
        if hit is not None:
            return hit
        if not state.grammar_slots.acquire(blocking=False):
            raise oa.ApiError(
                "every grammar thread is busy compiling other schemas; retry shortly",
                status=503,
                param=spec.param,
                code="server_busy",
            )

        def compile_it() -> Grammar:
            try:
                assert state.tokenizer is not None
                return grammars_for(state.tokenizer).compile(spec)
            finally:
                state.grammar_slots.release()

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(grammar_threads, compile_it), GRAMMAR_TIMEOUT_S
            )
        except GrammarError as exc:
            raise oa.ApiError(exc.message, param=exc.param) from None
        except TimeoutError:
            raise oa.ApiError(
                f"{spec.param}: the grammar took more than {GRAMMAR_TIMEOUT_S:.0f} s to compile; "
                "simplify it",
                param=spec.param,
            ) from None

    def _bytes(token: int) -> bytes:
        assert state.tokenizer is not None
        return state.tokenizer.token_bytes(token)

    def _token_text(token: int) -> str:
        assert state.tokenizer is not None
        return state.tokenizer.decode([token], skip_special_tokens=False)

    async def _completions(raw: bytes, request: Request) -> Response:
        assert state.tokenizer is not None
        body = oa.parse_request(oa.CompletionRequest, raw)
        _check_model(body.model)
        grammar = await _grammar(body.grammar_spec())
        gens: list[GenRequest] = []  # choice i * n + j: prompt i's choice j, as OpenAI orders
        echoes: list[str] = []  # with echo, each choice's prompt text
        for prompt in body.prompts():
            if body.suffix is not None:
                prompt = _fill_in_the_middle(prompt, body.suffix)
            ids = await _encode(prompt) if isinstance(prompt, str) else prompt
            choices_of = _gen_requests(body, ids, COMPLETION_DEFAULT_MAX_TOKENS, grammar)
            gens += choices_of
            kept = choices_of[0].prompt  # the prompt after truncation
            as_sent = isinstance(prompt, str) and len(kept) == len(ids)
            echoes += [prompt if as_sent else state.tokenizer.decode(kept)] * len(choices_of)
        reply = oa.Reply.new("cmpl", "text_completion", state.config.modelName)
        n_prompt = sum(len(g.prompt) for g in gens[:: body.n])
        want_ids = body.return_token_ids
        want_lps = gens[0].logprobs is not None

        def echoed(
            index: int,
            text: str,
            entries: tuple[TokenLogprob, ...],
            prompt_lps: Sequence[TokenLogprob],
        ) -> tuple[str, tuple[TokenLogprob, ...], int | None]:
            """Text and logprobs with the prompt's in front (echo)."""
            if not body.echo:
                return text, entries, None
            return echoes[index] + text, (*prompt_lps, *entries), gens[index].prompt[0]

        if body.stream:
            offsets = [0] * len(gens)
            started = [False] * len(gens)

            def chunk(index: int, out: Output) -> list[dict[str, Any]]:
                text, entries, head = out.text, out.logprobs, None
                if not started[index]:
                    started[index] = True
                    text, entries, head = echoed(index, text, entries, out.prompt_logprobs)
                if not (text or out.finish_reason or want_ids or want_lps):
                    return []  # a token that completes no character yet
                lps = None
                if want_lps:
                    lps = completion_logprobs(entries, _token_text, offsets[index], head)
                    offsets[index] += sum(len(t) for t in lps["tokens"])
                ids = out.token_ids if want_ids else None
                c = oa.choice(index, "text", text, out.finish_reason, ids, lps)
                return [reply.body([c])]

            return _streaming(gens, chunk, reply, _usage(body, n_prompt))
        choices, used = [], 0
        for index, answer in enumerate(await _collect_all(gens, request)):
            text, entries, head = echoed(
                index, answer.text, answer.logprobs, answer.prompt_logprobs
            )
            lps = completion_logprobs(entries, _token_text, 0, head) if want_lps else None
            ids = answer.token_ids if want_ids else None
            choices.append(oa.choice(index, "text", text, answer.finish_reason, ids, lps))
            used += len(answer.token_ids)
        return JSONResponse(reply.body(choices, (n_prompt, used)))

    async def _chat(raw: bytes, request: Request) -> Response:
        body = oa.parse_request(oa.ChatCompletionRequest, raw)
        _check_model(body.model)
        tools = body.offered_tools(state.config.toolCallParser)
        reasoning = state.config.reasoningParser is not None
        grammar = await _grammar(body.chat_grammar_spec(tools, reasoning))
        text = await asyncio.to_thread(_chat_prompt, body.template_messages(), tools)
        prompt = await _encode(text, add_bos=False)
        gens = _gen_requests(body, prompt, state.config.maxNewTokens, grammar)
        model = state.config.modelName
        n_prompt = len(gens[0].prompt)
        want_ids = body.return_token_ids
        want_lps = gens[0].logprobs is not None
        max_calls = None if body.parallel_tool_calls else 1

        def output() -> ChatOutput:
            return ChatOutput(reasoning, tools=bool(tools), max_calls=max_calls)

        if body.stream:
            reply = oa.Reply.new("chatcmpl", "chat.completion.chunk", model)
            started = [False] * len(gens)
            outputs = [output() for _ in gens]

            def chunk(index: int, out: Output) -> list[dict[str, Any]]:
                chunks = []
                if not started[index]:
                    started[index] = True
                    role = {"role": "assistant", "content": ""}
                    chunks.append(reply.body([oa.choice(index, "delta", role, None)]))
                final = out.finish_reason is not None
                delta = outputs[index].feed(out.text, final)
                if delta or final or want_ids or want_lps:
                    ids = out.token_ids if want_ids else None
                    lps = chat_logprobs(out.logprobs, _token_text, _bytes) if want_lps else None
                    finish = outputs[index].finish_reason(out.finish_reason)
                    c = oa.choice(index, "delta", delta, finish, ids, lps)
                    chunks.append(reply.body([c]))
                return chunks

            return _streaming(gens, chunk, reply, _usage(body, n_prompt))
        choices, used = [], 0
        for index, answer in enumerate(await _collect_all(gens, request)):
            parsed = output()
            message = parsed.message(answer.text)
            finish = parsed.finish_reason(answer.finish_reason)
            lps = chat_logprobs(answer.logprobs, _token_text, _bytes) if want_lps else None
            ids = answer.token_ids if want_ids else None
            choices.append(oa.choice(index, "message", message, finish, ids, lps))
            used += len(answer.token_ids)
        reply = oa.Reply.new("chatcmpl", "chat.completion", model)
        return JSONResponse(reply.body(choices, (n_prompt, used)))

    def _chat_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        """The prompt text: the messages, and the offered tools, through the chat template."""
        tok = state.tokenizer
        assert tok is not None
        try:
            return render_chat(
                messages,
                tok.chat_template,
                bos_token=tok.bos_token,
                eos_token=tok.eos_token,
                add_generation_prompt=True,
                tools=tools,
            )
        except ChatTemplateError as exc:
            raise oa.ApiError(str(exc), param="messages") from None

    def _usage(body: oa._Common, prompt_tokens: int) -> int | None:
        """The prompt tokens a stream's final usage chunk reports; None: no usage chunk."""
        wanted = body.stream_options and body.stream_options.include_usage
        return prompt_tokens if wanted else None

    def _submit(gen: GenRequest, sink: Sink) -> int:
        assert state.engine is not None
        try:
            return state.engine.submit(gen, sink)
        except RuntimeError as exc:
            raise oa.ApiError(str(exc), status=500, type="server_error") from None

    async def _collect(gen: GenRequest) -> Answer:
        """The whole answer of one choice."""
        engine = state.engine
        assert engine is not None
        stream = _Stream(asyncio.get_running_loop())
        seq_id = _submit(gen, stream.sink(0))
        outs: list[Output] = []
        try:
            while True:
                _, out = await stream.queue.get()
                if out.error:
                    raise oa.ApiError(out.error, status=500, type="server_error")
                outs.append(out)
                if out.finish_reason is not None:
                    return Answer(
                        "".join(o.text for o in outs),
                        [t for o in outs for t in o.token_ids],
                        out.finish_reason,
                        tuple(e for o in outs for e in o.logprobs),
                        outs[0].prompt_logprobs,
                    )
        except (asyncio.CancelledError, oa.ApiError):
            engine.abort(seq_id)
            raise

    async def _encode(text: str, add_bos: bool = True) -> list[int]:
        """Tokenize off the event loop, so a long prompt does not stall every stream."""
        assert state.tokenizer is not None
        return await asyncio.to_thread(state.tokenizer.encode, text, add_bos)

    async def _collect_all(gens: list[GenRequest], request: Request) -> list[Answer]:
        """Every choice's answer; one failing, or the client leaving, cancels (and so aborts)
        them all: a gone client's sequences must not keep their slots."""
        tasks = [asyncio.ensure_future(_collect(g)) for g in gens]
        answers = asyncio.gather(*tasks)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((answers, gone), return_when=asyncio.FIRST_COMPLETED)
            if not answers.done():
                raise oa.ApiError("client closed the request", status=499, code="client_closed")
            return list(answers.result())
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        finally:
            gone.cancel()

    def _streaming(
        gens: list[GenRequest],
        chunk: Callable[[int, Output], list[dict[str, Any]]],
        reply: oa.Reply,
        usage_prompt_tokens: int | None,
    ) -> StreamingResponse:
        """Server-sent events of every choice as its tokens come; [DONE] once all have ended."""
        engine = state.engine
        assert engine is not None
        stream = _Stream(asyncio.get_running_loop())
        seq_ids: list[int] = []
        try:
            for index, gen in enumerate(gens):
                seq_ids.append(_submit(gen, stream.sink(index)))
        except oa.ApiError:
            for seq_id in seq_ids:
                engine.abort(seq_id)
            raise

        async def events() -> AsyncIterator[bytes]:
            used = 0
            running = set(range(len(gens)))
            try:
                while running:
                    index, out = await stream.queue.get()
                    if out.error:
                        err = oa.ApiError(out.error, status=500, type="server_error")
                        yield _sse(err.body())
                        yield _sse("[DONE]")
                        return
                    used += len(out.token_ids)
                    for c in chunk(index, out):
                        yield _sse(c)
                    if out.finish_reason is not None:
                        running.discard(index)
                if usage_prompt_tokens is not None:
                    yield _sse(reply.usage_chunk(usage_prompt_tokens, used))
                yield _sse("[DONE]")
            finally:
                for index in running:
                    engine.abort(seq_ids[index])

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app
