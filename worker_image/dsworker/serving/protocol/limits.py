"""The engine-config bounds requests are checked against, once their prompt is token ids."""

from __future__ import annotations

from dataclasses import dataclass

from dsworker.serving.protocol.errors import ApiError


@dataclass(frozen=True)
class Limits:
    """The serving bounds of the engine config that requests are checked against."""

    max_input_tokens: int
    max_seq_len: int
    max_new_tokens: int
    truncation: bool
    vocab_size: int


def check_prompt_ids(ids: list[int], limits: Limits) -> list[int]:
    """Refuse bad ids and over-long prompts, or keep the last max_input_tokens when truncating."""
    if not ids:
        raise ApiError("prompt is empty after tokenization", param="prompt")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise ApiError(
            f"token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})",
            param="prompt",
        )
    if len(ids) > limits.max_input_tokens:
        if not limits.truncation:
            raise ApiError(
                f"prompt has {len(ids)} tokens, more than maxInputTokenLen "
                f"({limits.max_input_tokens}); shorten it",
                param="prompt",
                code="context_length_exceeded",
            )
        ids = ids[-limits.max_input_tokens :]
    return ids


def resolve_max_tokens(requested: int | None, default: int, prompt_len: int, limits: Limits) -> int:
    """The request's token budget: bounded by maxNewTokens, clipped to the room under maxSeqLen."""
    if requested is not None and requested > limits.max_new_tokens:
        raise ApiError(
            f"max_tokens {requested} exceeds this server's limit {limits.max_new_tokens}",
            param="max_tokens",
        )
    want = requested if requested is not None else min(default, limits.max_new_tokens)
    return max(1, min(want, limits.max_seq_len - prompt_len))
