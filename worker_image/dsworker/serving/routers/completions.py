"""POST /v1/completions: text or token-id prompts (a batch of them too), echo, fill-in-the-
middle, legacy logprobs; whole or streamed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dsworker.engine.requests import GenRequest, Output, TokenLogprob
from dsworker.serving.dispatch import Answer, collect_all
from dsworker.serving.endpoint import run_endpoint
from dsworker.serving.logprobs import TokenText, completion_logprobs, token_text
from dsworker.serving.prompts import check_model, encode, fill_in_the_middle, gen_requests
from dsworker.serving.protocol.common import parse_request
from dsworker.serving.protocol.completions import CompletionRequest
from dsworker.serving.protocol.responses import Reply, choice
from dsworker.serving.state import ServerState
from dsworker.serving.streaming import stream_response, usage_prompt_tokens

if TYPE_CHECKING:
    from dsworker.chat.grammars import Grammar

ENDPOINT = "/v1/completions"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

router = APIRouter()


@router.post(ENDPOINT)
async def completions(request: Request) -> Response:
    return await run_endpoint(request, ENDPOINT, complete)


@dataclass
class Choices:
    """A completion's engine requests (choice i * n + j: prompt i's choice j, as OpenAI orders
    them) and, for echo, each choice's prompt text."""

    gens: list[GenRequest]
    echoes: list[str]
    echo: bool

    def echoed(
        self,
        index: int,
        text: str,
        entries: tuple[TokenLogprob, ...],
        prompt_lps: Sequence[TokenLogprob],
    ) -> tuple[str, tuple[TokenLogprob, ...], int | None]:
        """Text and logprobs with the prompt's in front (echo), and the prompt's first token."""
        if not self.echo:
            return text, entries, None
        return self.echoes[index] + text, (*prompt_lps, *entries), self.gens[index].prompt[0]


async def choices_of(
    state: ServerState, body: CompletionRequest, grammar: Grammar | None
) -> Choices:
    """Every prompt of the request tokenized (FIM applied), n choices each."""
    _, tok = state.serving()
    gens: list[GenRequest] = []
    echoes: list[str] = []
    for prompt in body.prompts():
        if body.suffix is not None:
            prompt = fill_in_the_middle(tok, prompt, body.suffix)
        ids = await encode(tok, prompt) if isinstance(prompt, str) else prompt
        mine = gen_requests(state, body, ids, COMPLETION_DEFAULT_MAX_TOKENS, grammar)
        gens += mine
        kept = mine[0].prompt  # the prompt after truncation
        as_sent = isinstance(prompt, str) and len(kept) == len(ids)
        echoes += [prompt if as_sent else tok.decode(kept)] * len(mine)
    return Choices(gens, echoes, body.echo)


@dataclass
class Chunks:
    """A streamed completion's chunks: echo goes with each choice's first chunk, and
    text_offset counts on from the choice's earlier chunks."""

    reply: Reply
    choices: Choices
    text_of: TokenText
    want_ids: bool
    want_lps: bool
    offsets: list[int] = field(init=False)
    started: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = [0] * len(self.choices.gens)
        self.started = [False] * len(self.choices.gens)

    def __call__(self, index: int, out: Output) -> list[dict[str, Any]]:
        text, entries, head = out.text, out.logprobs, None
        if not self.started[index]:
            self.started[index] = True
            text, entries, head = self.choices.echoed(index, text, entries, out.prompt_logprobs)
        if not (text or out.finish_reason or self.want_ids or self.want_lps):
            return []  # a token that completes no character yet
        lps = None
        if self.want_lps:
            lps = completion_logprobs(entries, self.text_of, self.offsets[index], head)
            self.offsets[index] += sum(len(t) for t in lps["tokens"])
        ids = out.token_ids if self.want_ids else None
        return [self.reply.body([choice(index, "text", text, out.finish_reason, ids, lps)])]


def whole_body(
    reply: Reply,
    choices: Choices,
    answers: list[Answer],
    n_prompt: int,
    text_of: TokenText,
    want_ids: bool,
) -> dict[str, Any]:
    """A non-streamed completion's body, usage included."""
    want_lps = choices.gens[0].logprobs is not None
    out, used = [], 0
    for index, answer in enumerate(answers):
        text, entries, head = choices.echoed(
            index, answer.text, answer.logprobs, answer.prompt_logprobs
        )
        lps = completion_logprobs(entries, text_of, 0, head) if want_lps else None
        ids = answer.token_ids if want_ids else None
        out.append(choice(index, "text", text, answer.finish_reason, ids, lps))
        used += len(answer.token_ids)
    return reply.body(out, (n_prompt, used))


async def complete(state: ServerState, raw: bytes, request: Request) -> Response:
    engine, tok = state.serving()
    body = parse_request(CompletionRequest, raw)
    check_model(state, body.model)
    grammar = await state.grammars.compile(body.grammar_spec(), tok)
    choices = await choices_of(state, body, grammar)
    reply = Reply.new("cmpl", "text_completion", state.config.modelName)
    n_prompt = sum(len(g.prompt) for g in choices.gens[:: body.n])
    text_of = token_text(tok)
    if body.stream:
        want_lps = choices.gens[0].logprobs is not None
        chunks = Chunks(reply, choices, text_of, body.return_token_ids, want_lps)
        usage = usage_prompt_tokens(body, n_prompt)
        return stream_response(engine, choices.gens, chunks, reply, usage)
    answers = await collect_all(engine, choices.gens, request)
    return JSONResponse(
        whole_body(reply, choices, answers, n_prompt, text_of, body.return_token_ids)
    )
