"""The request and response types shared by the HTTP layer and the engine, without torch.

The server builds GenRequests and reads Outputs; the engine loop runs them. Keeping these here
lets `serving/` and `chat/` (and their tests) run without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # xgrammar loads only when a request is guided
    from dsworker.chat.grammars import Grammar

# Below this temperature sampling is greedy (division by ~0 would overflow anyway).
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler (validated upstream by openai_schema)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was already generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit)
    min_tokens: int = 0  # no `stops` token before this many tokens were generated
    stops: frozenset[int] = frozenset()  # the tokens that would end the sequence (EOS, stop ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def adjusted(self) -> bool:
        """Logits change before sampling: penalties, a logit bias or a minimum length."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.logit_bias
            or (self.min_tokens and self.stops)
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the most likely alternatives (token, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenRequest:
    """A validated request as the engine sees it."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()  # end the sequence (ignore_eos: EOS left out)
    logprobs: int | None = None  # None: none; k: each token's logprob and its k likeliest
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (echo)
    grammar: Grammar | None = None  # guided decoding: the output follows it; no MTP drafts


@dataclass(frozen=True)
class Output:
    """New text and tokens of one request since the last Output; final when finish_reason set.

    `logprobs` holds one entry per token of token_ids when the request asked for them;
    `prompt_logprobs` one per prompt token after the first, on the first Output only."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


Sink = Callable[[Output], None]
