"""The `logprobs` object of OpenAI responses, from the engine's per-token log-probabilities.

Completions use the legacy shape (parallel lists: tokens, token_logprobs, top_logprobs as
{token: logprob}, text_offset); chat uses `content`, one entry per token with its UTF-8 bytes
and a list of alternatives. Pure formatting: the token text comes from the caller's tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dsworker.engine.requests import TokenLogprob

if TYPE_CHECKING:
    from dsworker.serving.state import Tokenizer

TokenText = Callable[[int], str]
TokenBytes = Callable[[int], bytes]
# JSON has no -inf; a token the model rules out entirely is reported this low (as vLLM does).
FLOOR = -9999.0


def token_text(tokenizer: Tokenizer) -> TokenText:
    """A token's own text, special tokens included (what logprobs list)."""
    return lambda token: tokenizer.decode([token], skip_special_tokens=False)


def _finite(x: float) -> float:
    return x if x > FLOOR else FLOOR


def completion_logprobs(
    entries: Sequence[TokenLogprob], text: TokenText, offset: int = 0, first: int | None = None
) -> dict[str, Any]:
    """Legacy completions logprobs; text_offset counts characters from `offset`. `first` is a
    token listed before the entries with null logprobs (echo: the prompt's first token, which
    nothing before it predicts)."""
    head = [] if first is None else [text(first)]
    tokens = head + [text(e.token) for e in entries]
    offsets: list[int] = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [None] * len(head) + [_finite(e.logprob) for e in entries],
        "top_logprobs": [None] * len(head)
        + [{text(t): _finite(lp) for t, lp in (*e.top, (e.token, e.logprob))} for e in entries],
        "text_offset": offsets,
    }


def _chat_entry(token: int, logprob: float, text: TokenText, raw: TokenBytes) -> dict[str, Any]:
    return {"token": text(token), "logprob": _finite(logprob), "bytes": list(raw(token))}


def chat_logprobs(
    entries: Sequence[TokenLogprob], text: TokenText, raw: TokenBytes
) -> dict[str, Any]:
    """Chat completions logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}; `raw`
    gives a token's own bytes (part of a character, for some byte-level tokens)."""
    return {
        "content": [
            {
                **_chat_entry(e.token, e.logprob, text, raw),
                "top_logprobs": [_chat_entry(t, lp, text, raw) for t, lp in e.top],
            }
            for e in entries
        ]
    }
