"""Continuous batching as pure bookkeeping: which sequences run in the next forward step.

No torch, no I/O, no clock: the engine loop feeds it requests and sampled tokens, it answers with
steps and finish events, so every policy decision is unit-testable. Each sequence holds one slot.
Without paging a slot holds maxSeqLen positions. With paging, the KV cache is pages of a fixed size
per dp group, taken as they are needed: a sequence starts with pages for its prompt and its first
new token (and its MTP drafts), and takes one more page whenever its next token (and, if there is a
page free, its drafts) would not fit. When a dp group has no page left for a decoding sequence's
next token, the sequence that started last in that group is preempted: its pages go back (its full
ones stay cached for prefix reuse), and it waits first in line to compute its prompt and output
again, without sampling, before it decodes on (recompute, as vLLM does). So memory goes to tokens
that exist, not to max_tokens that may never come. Which slot and dp group a waiting sequence
gets, and when it waits, is `admission`'s to decide.

Policy per step: every decoding sequence contributes its one new token (plus its MTP drafts);
the rest of the step's token budget (maxPrefillTokens) goes to prompts in arrival order, in chunks,
so a long prompt never stalls running decodes for more than one chunk. With prefix caching, a
prompt that starts with full pages another prompt is computing right now waits (letting later
ones pass) until those pages are registered, then reuses them: n > 1 choices compute their
prompt once. A sequence that scores its prompt (echo with logprobs) wants the logits of every
prompt position: it reuses no cached pages, and its chunks yield a row per prompt position
(`prompt_rows`), at most MAX_PROMPT_ROWS a step.

Speculative decoding (MTP): after a step, `draft_inputs` says which positions the MTP layer reads
(each position's hidden state and the token after it); the drafts it proposes ride in the next
decode item behind the last token, the main model verifies them, and `update` takes the tokens
that verification emitted (one more than the drafts it accepted). A rejected draft's cache entry
is simply overwritten by a later step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from collections.abc import Sequence as Seq

from dsworker.engine.admission import place, position_limit, waits_for_prefix
from dsworker.engine.kv_pages import PagePool, Paging
from dsworker.engine.steps import DraftInput, FinishReason, Sequence, Step, StepItem, TokenEvent

# Prompt positions scored per step: each is a row of vocabulary logits (~0.5 MiB in fp32 for V3).
MAX_PROMPT_ROWS = 512


class SchedulerError(ValueError):
    """A request the scheduler cannot hold (caller bug: validation should have caught it)."""


class Scheduler:
    """FIFO continuous batching over a fixed set of KV slots."""

    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        max_step_tokens: int,
        drafts: int = 0,
        paging: Paging | None = None,
    ) -> None:
        """drafts: MTP draft tokens per decode item; a full batch of decodes must fit a step, so
        the token budget is at least max_batch_size * (1 + drafts)."""
        if max_batch_size < 1 or max_seq_len < 2 or max_step_tokens < 1:
            raise SchedulerError("max_batch_size, max_seq_len >= 2 and max_step_tokens must be > 0")
        if paging is not None and paging.pages < paging.needed(max_seq_len):
            raise SchedulerError(
                f"{paging.pages} KV pages of {paging.page_size} positions per dp group hold "
                f"less than one sequence of max_seq_len {max_seq_len}"
            )
        self.paging = paging
        self.pools: list[PagePool] = (
            [
                PagePool(paging.pages, paging.page_size, paging.prefix_caching, int(drafts > 0))
                for _ in range(paging.dp)
            ]
            if paging
            else []
        )
        self.reused_tokens = 0  # prompt tokens whose cache came from earlier sequences
        self.preemptions = 0  # sequences sent back to wait for pages
        self.drafts = drafts
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.max_step_tokens = max(max_step_tokens, max_batch_size * (1 + drafts))
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
        seq = self.running.get(seq_id)
        if seq is not None:
            self._release(seq)
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

    @property
    def kv_usage(self) -> float:
        """Share of the KV cache running sequences hold (idle prefix pages count as free)."""
        if self.paging is None:
            return len(self.running) / self.max_batch_size
        held = sum(len(pool.refs) for pool in self.pools)
        return held / (self.paging.pages * self.paging.dp)

    def schedule(self) -> Step | None:
        """The next step, or None when nothing can run."""
        if self.paging is not None:
            self._grow()
        items: list[StepItem] = []
        budget = self.max_step_tokens
        prefilling: list[Sequence] = []
        for seq in self.running.values():
            if seq.prefilling:
                prefilling.append(seq)
                continue
            items.append(self._decode_item(seq))
            budget -= len(items[-1].tokens)
        # Prompts already holding a slot continue before new ones are admitted.
        # Arrival order, except that a prompt waiting for another's pages lets later ones pass.
        held: list[Sequence] = []
        while budget > 0 and self.waiting and self.free_slots:
            if waits_for_prefix(self.waiting[0], self.running.values(), self.paging):
                held.append(self.waiting.popleft())
                if len(held) >= self.max_batch_size:  # enough looking past them for one step
                    break
                continue
            if not self._admit(self.waiting[0]):
                break
            seq = self.waiting.popleft()
            self.running[seq.seq_id] = seq
            prefilling.append(seq)
            if sum(s.prefill_end - s.num_cached for s in prefilling) >= budget:
                break
        self.waiting.extendleft(reversed(held))
        scoring = MAX_PROMPT_ROWS
        for seq in prefilling:
            if budget <= 0:
                break
            if not seq.prefilling:  # a returning sequence whose every page was still cached
                items.append(self._decode_item(seq))
                budget -= 1
                continue
            assert seq.slot is not None
            start = seq.num_cached
            n = min(seq.prefill_end - start, budget)
            if seq.score_prompt:
                if scoring <= 0:
                    continue
                n = min(n, scoring)
            chunk = tuple(seq.token_at(i) for i in range(start, start + n))
            # A recomputed sequence's last chunk samples nothing: its next token is known.
            sample = start + n == seq.prefill_end and not seq.output
            scored = min(start + n, len(seq.prompt) - 1) - start if seq.score_prompt else 0
            pages = self._announce(seq)
            items.append(StepItem(seq.seq_id, seq.slot, start, chunk, sample, 0, pages, scored))
            budget -= n
            scoring -= scored
        return Step(tuple(items)) if items else None

    def _decode_item(self, seq: Sequence) -> StepItem:
        """Feed the last sampled token, whose KV entry is not cached yet, and the drafts after
        it, as many as the cache has positions for."""
        assert seq.slot is not None
        pos = seq.num_cached
        room = seq.capacity - seq.num_tokens
        toks = (seq.token_at(pos), *seq.drafts[:room])
        pages = self._announce(seq)
        return StepItem(seq.seq_id, seq.slot, pos, toks, True, len(toks) - 1, pages)

    def _admit(self, seq: Sequence) -> bool:
        """Give the sequence a free slot (and, with paging, the pages `admission.place` picks);
        False leaves it waiting, first in line."""
        if not self.free_slots:
            return False
        if self.paging is None:
            seq.slot, seq.capacity = self.free_slots.popleft(), self.max_seq_len
            return True
        at = place(
            seq,
            self.free_slots,
            self.pools,
            self.running.values(),
            self.paging,
            self.drafts,
            self.max_seq_len,
        )
        if at is None:
            return False
        self.free_slots.remove(at.slot)
        seq.slot = at.slot
        pool = self.pools[at.slot % self.paging.dp]
        self._set_pages(seq, tuple(pool.take(at.matched, at.need - len(at.matched))))
        seq.num_cached = len(at.matched) * self.paging.page_size
        seq.hashed, seq.chain = len(at.matched), at.chain
        seq.mtp_cached = seq.num_cached
        if not seq.output:  # a returning sequence's own pages are no prefix-cache hit
            self.reused_tokens += seq.num_cached
        return True

    def _announce(self, seq: Sequence) -> tuple[int, ...]:
        """The pages a step item brings: all of them when they changed since the last item."""
        if seq.announced:
            return ()
        seq.announced = True
        return seq.pages

    def _grow(self) -> None:
        """Pages for every decoding sequence's next token (oldest first), preempting the newest
        sequence of its dp group when none is left; then pages for drafts, from free pages only
        (never a cached prefix page, never one a later sequence's next token needs).

        With MTP, room for the drafts after this step too: the draft pass chains them into the
        pages the sequence holds now, so a page taken later would cut the chain short."""
        assert self.paging is not None
        for seq in list(self.running.values()):
            if seq.seq_id not in self.running or seq.prefilling:
                continue
            assert seq.slot is not None
            pool = self.pools[seq.slot % self.paging.dp]
            while seq.capacity < seq.num_tokens:
                if pool.available(()):
                    self._take_page(seq, pool)
                    continue
                victim = self._victim(seq)
                self._preempt(victim)
                if victim is seq:
                    break
        if not self.drafts:
            return
        for seq in self.running.values():
            if seq.prefilling:
                continue
            assert seq.slot is not None
            pool = self.pools[seq.slot % self.paging.dp]
            want = min(
                seq.num_tokens + len(seq.drafts) + 1 + self.drafts,
                position_limit(seq, self.max_seq_len),
            )
            while seq.capacity < want and pool.free:
                self._take_page(seq, pool)

    def _set_pages(self, seq: Sequence, pages: tuple[int, ...]) -> None:
        """The sequence's pages, the positions they hold, and that they go out again."""
        assert self.paging is not None
        seq.pages, seq.announced = pages, False
        seq.capacity = min(len(pages) * self.paging.page_size, self.max_seq_len)

    def _take_page(self, seq: Sequence, pool: PagePool) -> None:
        self._set_pages(seq, (*seq.pages, *pool.take((), 1)))

    def _release(self, seq: Sequence) -> None:
        """Take a running sequence off its slot and hand its pages back (finish, preemption)."""
        assert seq.slot is not None
        del self.running[seq.seq_id]
        self.free_slots.append(seq.slot)
        if self.paging is not None:
            self.pools[seq.slot % self.paging.dp].release(seq.pages)
            self._set_pages(seq, ())

    def _victim(self, asking: Sequence) -> Sequence:
        """The sequence of `asking`'s dp group that started last, not one scoring its prompt
        (its prompt rows are half sent); at worst `asking` itself."""
        assert self.paging is not None and asking.slot is not None
        group = asking.slot % self.paging.dp
        for seq in reversed(self.running.values()):
            scoring = seq.score_prompt and seq.prefilling  # never `asking`: it decodes
            if seq.slot is not None and seq.slot % self.paging.dp == group and not scoring:
                return seq
        return asking

    def _preempt(self, seq: Sequence) -> None:
        """Hand the sequence's slot and pages back and queue it first, to be recomputed."""
        self._release(seq)
        seq.slot = None
        seq.num_cached = seq.hashed = seq.chain = seq.mtp_cached = 0
        seq.drafts = ()
        seq.score_prompt = False  # its prompt rows went out with its first pass
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _register_full_pages(self, seq: Sequence) -> None:
        """Pages whose every position is cached (prompt and accepted output alike; with MTP,
        in the MTP layer too) become reusable under the hash of the tokens up to their end."""
        if self.paging is None or not self.paging.prefix_caching:
            return
        p, pool = self.paging.page_size, self.pools[(seq.slot or 0) % self.paging.dp]
        # Positions past the output (drafts kept beyond a finish) hold no token to hash.
        end = min(seq.num_cached, seq.num_tokens)
        if pool.lookahead:  # MTP entries too, written by the draft pass (lookahead token there)
            end = min(end, seq.mtp_cached)
        while (seq.hashed + 1) * p <= end:
            lo = seq.hashed * p
            span = range(lo, lo + p + pool.lookahead)
            seq.chain = pool.chain(seq.chain, [seq.token_at(i) for i in span])
            pool.register(seq.pages[seq.hashed], seq.chain)
            seq.hashed += 1

    def update(self, step: Step, sampled: Mapping[int, Seq[int]]) -> list[TokenEvent]:
        """Record a finished step: cached counts advance, sampled tokens append, limits apply.

        `sampled` maps seq_id -> the tokens a sampling item emitted: one, plus one per draft the
        main model accepted (the accepted drafts, then its own next token). Sequences finished
        meanwhile (finish() during the forward) are skipped; tokens past a finish are dropped.
        """
        events: list[TokenEvent] = []
        for item in step.items:
            seq = self.running.get(item.seq_id)
            if seq is None:
                continue
            seq.drafts = ()
            seq.num_cached = item.start + len(item.tokens)
            if not item.sample:
                self._register_full_pages(seq)
                continue
            tokens = sampled[item.seq_id]
            if not 1 <= len(tokens) <= 1 + item.drafts:
                raise SchedulerError(
                    f"sequence {seq.seq_id}: {len(tokens)} tokens for an item with "
                    f"{item.drafts} drafts"
                )
            # Drafts the main model rejected left cache entries that the next step overwrites.
            seq.num_cached -= item.drafts - (len(tokens) - 1)
            reason: FinishReason | None = None
            for token in tokens:
                seq.output.append(token)
                if token in seq.stop_token_ids:
                    reason = FinishReason.STOP
                elif len(seq.output) >= seq.max_tokens or seq.num_tokens >= self.max_seq_len:
                    reason = FinishReason.LENGTH
                events.append(TokenEvent(seq.seq_id, token, reason))
                if reason is not None:
                    break
            self._register_full_pages(seq)  # before a finish hands the pages back
            if reason is not None:
                self.finish(seq.seq_id, reason)
        return events

    def draft_inputs(self, step: Step) -> tuple[DraftInput, ...]:
        """After `update`: the MTP layer's reads for each item of a still-running sequence.

        Each position of the item whose cache entry stayed valid is paired with the token after
        it; a mid-prompt chunk's last position pairs with the next chunk's first prompt token.
        """
        out: list[DraftInput] = []
        for index, item in enumerate(step.items):
            seq = self.running.get(item.seq_id)
            if seq is None:
                continue
            end = min(seq.num_cached, seq.num_tokens - 1)
            if end > item.start:
                out.append(DraftInput(index, end - item.start, seq.token_at(end)))
        return tuple(out)

    def drafted(self, step: Step, inputs: Seq[DraftInput]) -> None:
        """The MTP pass over `inputs` ran: their positions' MTP entries are written, so pages
        they complete may be shared (a finished sequence's last step never gets that far)."""
        for d in inputs:
            item = step.items[d.index]
            seq = self.running.get(item.seq_id)
            if seq is not None:
                seq.mtp_cached = max(seq.mtp_cached, item.start + d.count)
                self._register_full_pages(seq)

    def set_drafts(self, drafts: Mapping[int, Seq[int]]) -> None:
        """seq_id -> the MTP layer's draft tokens for its next decode step."""
        for seq_id, tokens in drafts.items():
            seq = self.running.get(seq_id)
            if seq is not None and not seq.prefilling:
                seq.drafts = tuple(tokens)
