"""POST /v1/completions' request."""

from __future__ import annotations

from pydantic import Field, model_validator

from dsworker.serving.protocol.common import MAX_CHOICES, MAX_LOGPROBS, CommonRequest
from dsworker.serving.protocol.errors import ApiError


class CompletionRequest(CommonRequest):
    """POST /v1/completions: one prompt, as text or as token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Each token's logprob and this many likeliest."
    )
    echo: bool = Field(
        False, description="Prefix each choice with its prompt (and the prompt's logprobs)."
    )
    suffix: str | None = Field(
        None,
        description="Fill in the middle: the text after the completion (models with FIM tokens).",
    )
    best_of: int | None = Field(None, ge=1, le=1)

    @model_validator(mode="after")
    def _suffix_with_text(self) -> CompletionRequest:
        if self.suffix is not None and self.echo:
            raise ValueError("suffix and echo cannot be combined")
        return self

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_logprob_count(self) -> int | None:
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string or id list, or a batch of them (each gets n choices)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if len(p) * self.n > MAX_CHOICES:
            raise ApiError(
                f"{len(p)} prompts x n {self.n} is more than {MAX_CHOICES} choices; split the "
                "batch",
                param="prompt",
            )
        return list(p)  # type: ignore[arg-type]
