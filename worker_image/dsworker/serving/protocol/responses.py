"""The bodies every response is made of: choices, usage, and what one response's bodies share."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice(
    index: int,
    key: str,
    value: Any,
    finish_reason: str | None,
    token_ids: list[int] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One choice: `key` is "text" (completions), "message" (chat) or "delta" (chat chunks)."""
    out: dict[str, Any] = {
        "index": index,
        key: value,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
    if token_ids is not None:
        out["token_ids"] = token_ids
    return out


@dataclass(frozen=True)
class Reply:
    """What every body of one response shares (a stream's chunks alike): id, object, model,
    and one creation time."""

    id: str
    object: str
    model: str
    created: int

    @classmethod
    def new(cls, prefix: str, obj: str, model: str) -> Reply:
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", obj, model, int(time.time()))

    def body(
        self, choices: list[dict[str, Any]], tokens: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """A response or stream chunk; `tokens` (prompt, completion) adds usage."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if tokens is not None:
            out["usage"] = usage(*tokens)
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last stream chunk when stream_options.include_usage asks for it: no choices."""
        return self.body([], (prompt_tokens, completion_tokens))
