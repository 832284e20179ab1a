"""Continuous batching as pure bookkeeping: which sequences run in the next forward step.

No torch, no I/O, no clock: the engine loop feeds it requests and sampled tokens, it answers with
steps and finish events, so every policy decision is unit-testable. The KV cache is one slot per
sequence (capacity maxSeqLen), so admission is "is a slot free" and nothing is ever preempted.

Policy per step: every decoding sequence contributes its one new token; the rest of the step's
token budget (maxPrefillTokens) goes to prompts in arrival order, in chunks, so a long prompt never
stalls running decodes for more than one chunk.
"""

from __future__ import annotations

from collections import deque
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
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    num_cached: int = 0  # tokens whose KV entries are in the cache
    finish_reason: FinishReason | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < len(self.prompt)

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


@dataclass(frozen=True)
class TokenEvent:
    """A token appended to a sequence, and whether that finished it."""

    seq_id: int
    token: int
    finish_reason: FinishReason | None


class SchedulerError(ValueError):
    """A request the scheduler cannot hold (caller bug: validation should have caught it)."""


class Scheduler:
    """FIFO continuous batching over a fixed set of KV slots."""

    def __init__(self, max_batch_size: int, max_seq_len: int, max_step_tokens: int) -> None:
        if max_batch_size < 1 or max_seq_len < 2 or max_step_tokens < 1:
            raise SchedulerError("max_batch_size, max_seq_len >= 2 and max_step_tokens must be > 0")
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_step_tokens = max(max_step_tokens, max_batch_size)
        self.free_slots: deque[int] = deque(range(max_batch_size))
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # seq_id -> sequence holding a slot

    # -- intake -------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; its prompt must leave room for at least one new token."""
        if not seq.prompt:
            raise SchedulerError(f"sequence {seq.seq_id}: empty prompt")
        if len(seq.prompt) >= self.max_seq_len:
            raise SchedulerError(
                f"sequence {seq.seq_id}: prompt of {len(seq.prompt)} tokens leaves no room "
                f"under max_seq_len {self.max_seq_len}"
            )
        if seq.max_tokens < 1:
            raise SchedulerError(f"sequence {seq.seq_id}: max_tokens must be >= 1")
        if seq.seq_id in self.running or any(s.seq_id == seq.seq_id for s in self.waiting):
            raise SchedulerError(f"sequence {seq.seq_id} already queued")
        self.waiting.append(seq)

    def finish(self, seq_id: int, reason: FinishReason) -> Sequence | None:
        """End a sequence early (stop string matched, client gone); frees its slot."""
        seq = self.running.pop(seq_id, None)
        if seq is not None:
            assert seq.slot is not None
            self.free_slots.append(seq.slot)
        else:
            for s in self.waiting:
                if s.seq_id == seq_id:
                    seq = s
                    self.waiting.remove(s)
                    break
        if seq is not None and seq.finish_reason is None:
            seq.finish_reason = reason
        return seq

    # -- stepping -----------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self) -> Step | None:
        """The next step, or None when nothing can run."""
        items: list[StepItem] = []
        budget = self.max_step_tokens
        prefilling: list[Sequence] = []
        for seq in self.running.values():
            if seq.prefilling:
                prefilling.append(seq)
                continue
            # Decode: feed the last sampled token, whose KV entry is not cached yet.
            assert seq.slot is not None
            pos = seq.num_cached
            items.append(StepItem(seq.seq_id, seq.slot, pos, (seq.token_at(pos),), True))
            budget -= 1
        # Prompts already holding a slot continue before new ones are admitted.
        while budget > 0 and self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.popleft()
            self.running[seq.seq_id] = seq
            prefilling.append(seq)
            if sum(len(s.prompt) - s.num_cached for s in prefilling) >= budget:
                break
        for seq in prefilling:
            if budget <= 0:
                break
            assert seq.slot is not None
            n = min(len(seq.prompt) - seq.num_cached, budget)
            chunk = tuple(seq.prompt[seq.num_cached : seq.num_cached + n])
            last = seq.num_cached + n == len(seq.prompt)
            items.append(StepItem(seq.seq_id, seq.slot, seq.num_cached, chunk, last))
            budget -= n
        return Step(tuple(items)) if items else None

    def update(self, step: Step, sampled: dict[int, int]) -> list[TokenEvent]:
        """Record a finished step: cached counts advance, sampled tokens append, limits apply.

        `sampled` maps seq_id -> token for the step's sampling items; sequences finished
        meanwhile (finish() during the forward) are skipped.
        """
        events: list[TokenEvent] = []
        for item in step.items:
            seq = self.running.get(item.seq_id)
            if seq is None:
                continue
            seq.num_cached = item.start + len(item.tokens)
            if not item.sample:
                continue
            token = sampled[item.seq_id]
            seq.output.append(token)
            reason: FinishReason | None = None
            if token in seq.stop_token_ids and not seq.ignore_eos:
                reason = FinishReason.STOP
            elif len(seq.output) >= seq.max_tokens or seq.num_tokens >= self.max_seq_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                self.finish(seq.seq_id, reason)
            events.append(TokenEvent(seq.seq_id, token, reason))
        return events
