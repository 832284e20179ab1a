"""From a validated request to the engine's requests: the model check, the prompt's token ids
(fill-in-the-middle, the chat template, tokenization off the event loop) and one GenRequest per
choice within the engine config's limits."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from dsworker.chat.template import ChatTemplateError, render_chat
from dsworker.engine.requests import GenRequest
from dsworker.serving.protocol.common import CommonRequest
from dsworker.serving.protocol.errors import ApiError
from dsworker.serving.protocol.limits import check_prompt_ids, resolve_max_tokens
from dsworker.serving.state import ServerState, Tokenizer

if TYPE_CHECKING:
    from dsworker.chat.grammars import Grammar


def check_model(state: ServerState, name: str | None) -> None:
    """A request naming another model than the served one is a 404."""
    if name not in (None, "", state.config.modelName):
        raise ApiError(
            f"model {name!r} is not served here; use {state.config.modelName!r}",
            status=404,
            param="model",
            code="model_not_found",
        )


def gen_requests(
    state: ServerState,
    body: CommonRequest,
    prompt: list[int],
    default_max: int,
    grammar: Grammar | None = None,
) -> list[GenRequest]:
    """One engine request per choice (n); a seeded request's choice i is seeded seed + i."""
    assert state.tokenizer is not None
    limits = state.limits
    prompt = check_prompt_ids(prompt, limits)
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    params = body.sampling()
    outside = [t for t, _ in params.logit_bias if t >= limits.vocab_size]
    if outside:
        raise ApiError(
            f"logit_bias tokens {outside[:5]} are outside the vocabulary [0, {limits.vocab_size})",
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
        max_tokens=resolve_max_tokens(requested, default_max, len(prompt), limits),
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


def fill_in_the_middle(tokenizer: Tokenizer, prompt: str | list[int], suffix: str) -> str:
    """DeepSeek's FIM prompt: the model writes what goes between `prompt` and `suffix`."""
    fim = tokenizer.fim_tokens
    if fim is None:
        raise ApiError(
            "suffix needs a model whose tokenizer has DeepSeek's fill-in-the-middle tokens "
            "(<｜fim▁begin｜>, <｜fim▁hole｜>, <｜fim▁end｜>); this one has none",
            param="suffix",
        )
    if not isinstance(prompt, str):
        raise ApiError("suffix needs a text prompt, not token ids", param="suffix")
    begin, hole, end = fim
    return f"{begin}{prompt}{hole}{suffix}{end}"


def chat_prompt(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> str:
    """The prompt text: the messages, and the offered tools, through the chat template."""
    try:
        return render_chat(
            messages,
            tokenizer.chat_template,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            add_generation_prompt=True,
            tools=tools,
        )
    except ChatTemplateError as exc:
        raise ApiError(str(exc), param="messages") from None


async def encode(tokenizer: Tokenizer, text: str, add_bos: bool = True) -> list[int]:
    """Tokenize off the event loop, so a long prompt does not stall every stream."""
    return await asyncio.to_thread(tokenizer.encode, text, add_bos)
