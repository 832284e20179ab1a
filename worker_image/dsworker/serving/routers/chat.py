"""POST /v1/chat/completions: messages through the chat template, tools and tool_choice,
R1's reasoning apart from the answer, chat logprobs; whole or streamed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dsworker.chat.assistant_message import ChatOutput
from dsworker.engine.requests import Output
from dsworker.serving.dispatch import Answer, collect_all
from dsworker.serving.endpoint import run_endpoint
from dsworker.serving.logprobs import TokenBytes, TokenText, chat_logprobs, token_text
from dsworker.serving.prompts import chat_prompt, check_model, encode, gen_requests
from dsworker.serving.protocol.chat import ChatCompletionRequest
from dsworker.serving.protocol.common import parse_request
from dsworker.serving.protocol.responses import Reply, choice
from dsworker.serving.state import ServerState
from dsworker.serving.streaming import stream_response, usage_prompt_tokens

ENDPOINT = "/v1/chat/completions"

router = APIRouter()


@router.post(ENDPOINT)
async def chat(request: Request) -> Response:
    return await run_endpoint(request, ENDPOINT, chat_complete)


@dataclass(frozen=True)
class Parsing:
    """How each choice's text becomes a message: R1's reasoning split, tool calls, and the
    token text and bytes its logprobs list."""

    reasoning: bool
    tools: bool
    max_calls: int | None
    text_of: TokenText
    bytes_of: TokenBytes
    want_ids: bool
    want_lps: bool

    def output(self) -> ChatOutput:
        return ChatOutput(self.reasoning, tools=self.tools, max_calls=self.max_calls)

    def logprobs(self, out: Output | Answer) -> dict[str, Any] | None:
        return chat_logprobs(out.logprobs, self.text_of, self.bytes_of) if self.want_lps else None


@dataclass
class Chunks:
    """A streamed chat's chunks: the role first, then each choice's deltas as they parse."""

    reply: Reply
    parsing: Parsing
    choices: int
    started: list[bool] = field(init=False)
    outputs: list[ChatOutput] = field(init=False)

    def __post_init__(self) -> None:
        self.started = [False] * self.choices
        self.outputs = [self.parsing.output() for _ in range(self.choices)]

    def __call__(self, index: int, out: Output) -> list[dict[str, Any]]:
        p = self.parsing
        chunks = []
        if not self.started[index]:
            self.started[index] = True
            role = {"role": "assistant", "content": ""}
            chunks.append(self.reply.body([choice(index, "delta", role, None)]))
        final = out.finish_reason is not None
        delta = self.outputs[index].feed(out.text, final)
        if delta or final or p.want_ids or p.want_lps:
            ids = out.token_ids if p.want_ids else None
            finish = self.outputs[index].finish_reason(out.finish_reason)
            c = choice(index, "delta", delta, finish, ids, p.logprobs(out))
            chunks.append(self.reply.body([c]))
        return chunks


def whole_body(
    model: str, parsing: Parsing, answers: list[Answer], n_prompt: int
) -> dict[str, Any]:
    """A non-streamed chat completion's body, usage included."""
    choices, used = [], 0
    for index, answer in enumerate(answers):
        parsed = parsing.output()
        message = parsed.message(answer.text)
        finish = parsed.finish_reason(answer.finish_reason)
        ids = answer.token_ids if parsing.want_ids else None
        choices.append(choice(index, "message", message, finish, ids, parsing.logprobs(answer)))
        used += len(answer.token_ids)
    reply = Reply.new("chatcmpl", "chat.completion", model)
    return reply.body(choices, (n_prompt, used))


async def chat_complete(state: ServerState, raw: bytes, request: Request) -> Response:
    engine, tok = state.serving()
    body = parse_request(ChatCompletionRequest, raw)
    check_model(state, body.model)
    tools = body.offered_tools(state.config.toolCallParser)
    reasoning = state.config.reasoningParser is not None
    grammar = await state.grammars.compile(body.chat_grammar_spec(tools, reasoning), tok)
    text = await asyncio.to_thread(chat_prompt, tok, body.template_messages(), tools)
    prompt = await encode(tok, text, add_bos=False)
    gens = gen_requests(state, body, prompt, state.config.maxNewTokens, grammar)
    model = state.config.modelName
    n_prompt = len(gens[0].prompt)
    parsing = Parsing(
        reasoning,
        tools=bool(tools),
        max_calls=None if body.parallel_tool_calls else 1,
        text_of=token_text(tok),
        bytes_of=tok.token_bytes,
        want_ids=body.return_token_ids,
        want_lps=gens[0].logprobs is not None,
    )
    if body.stream:
        reply = Reply.new("chatcmpl", "chat.completion.chunk", model)
        chunks = Chunks(reply, parsing, len(gens))
        return stream_response(engine, gens, chunks, reply, usage_prompt_tokens(body, n_prompt))
    answers = await collect_all(engine, gens, request)
    return JSONResponse(whole_body(model, parsing, answers, n_prompt))
