"""What the scheduler keeps and hands out: sequences, steps and their items, the MTP layer's
inputs after a step, and the token events a step yields.

Pure data, no torch: `step_wire` encodes steps for the other ranks, the runner turns them into the
model's batches, the loop reads the events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    """OpenAI's finish_reason values (plus abort for a vanished client)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class Sequence:
    """One request's tokens and where its KV cache lives."""

    seq_id: int
    prompt: list[int]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()  # EOS unless ignore_eos, and the request's
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    num_cached: int = 0  # tokens whose KV entries are in the cache
    finish_reason: FinishReason | None = None
    drafts: tuple[int, ...] = ()  # the MTP layer's guesses at the tokens after the last output
    pages: tuple[int, ...] = ()  # KV pages in position order (paging only)
    capacity: int = 0  # positions its pages hold
    announced: bool = False  # its current pages went out with a step item
    hashed: int = 0  # leading pages registered for prefix caching (or reused)
    chain: int = 0  # the hash of the last of them
    mtp_cached: int = 0  # positions whose MTP-layer entries are written (MTP only)
    score_prompt: bool = False  # logits at every prompt position wanted: none reused from cache

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def prefill_end(self) -> int:
        """Positions computed before decoding: the prompt, or after a preemption every token but
        the last (which the next decode step feeds, as it would have)."""
        return len(self.prompt) + max(0, len(self.output) - 1)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prefill_end

    def head(self, n: int) -> list[int]:
        """The first `n` tokens of prompt and output (all of them when n >= num_tokens): what a
        recomputed sequence's cache holds."""
        k = len(self.prompt)
        return self.prompt[:n] if n <= k else [*self.prompt, *self.output[: n - k]]

    def token_at(self, i: int) -> int:
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]


@dataclass(frozen=True)
class StepItem:
    """One sequence's part of a step: `tokens` at positions start.. written to `slot`."""

    seq_id: int
    slot: int
    start: int
    tokens: tuple[int, ...]
    sample: bool  # the last token's logits yield the next token (False: a mid-prompt chunk)
    drafts: int = 0  # trailing tokens that are MTP drafts for the main model to verify
    pages: tuple[int, ...] = ()  # the slot's KV pages, whenever they changed (paging)
    prompt_rows: int = 0  # leading positions whose logits score the prompt token after each

    @property
    def verify_rows(self) -> int:
        """Logit rows this item yields when sampled: the last real token and each draft."""
        return 1 + self.drafts if self.sample else 0

    @property
    def rows(self) -> int:
        """Logit rows the item yields, for its last `rows` positions: prompt rows, verify rows."""
        return self.prompt_rows + self.verify_rows


@dataclass(frozen=True)
class Step:
    """One forward pass: what every rank runs (rank 0 broadcasts it)."""

    items: tuple[StepItem, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(i.tokens) for i in self.items)

    @property
    def sampled(self) -> list[StepItem]:
        return [i for i in self.items if i.sample]

    @property
    def with_rows(self) -> list[StepItem]:
        """Items that yield logit rows, in step order: the runner's output holds theirs."""
        return [i for i in self.items if i.rows]


@dataclass(frozen=True)
class DraftInput:
    """What the MTP layer reads for step item `index` after sampling: its first `count`
    positions, each with the token that followed it; the draft comes from the last one.

    Only the token after the last position (`last`: a sampled token or the next prompt chunk's
    first) is new; the others are the item's own tokens one on, which every rank already has.
    """

    index: int
    count: int
    last: int

    def tokens(self, item: StepItem) -> tuple[int, ...]:
        """The `count` tokens that followed the item's first `count` positions."""
        if not 1 <= self.count <= len(item.tokens):
            raise ValueError(
                f"a draft input reads 1 to {len(item.tokens)} positions of item {self.index}, "
                f"not {self.count}"
            )
        return (*item.tokens[1 : self.count], self.last)


@dataclass(frozen=True)
class TokenEvent:
    """A token appended to a sequence, and whether that finished it."""

    seq_id: int
    token: int
    finish_reason: FinishReason | None


class StepError(RuntimeError):
    """A step every rank refused identically (e.g. a full AllToAll buffer): its sequences fail,
    the group lives on. Anything else a forward raises is fatal."""
