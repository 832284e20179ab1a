"""Admission: whether a waiting sequence may start now, and in which slot and dp group.

Pure functions over the scheduler's state (no torch, nothing changed here): the scheduler applies
what they decide. A sequence needs a free slot and, with paging, pages for its tokens, the next
one and its drafts, with a page to spare for each sequence of its dp group that may still need
one. With prefix caching it takes the dp group that reuses the most of its leading pages, and a
prompt whose leading pages another prompt is computing right now waits for them instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dsworker.engine.kv_pages import PagePool, Paging
from dsworker.engine.steps import Sequence


@dataclass(frozen=True)
class Placement:
    """Where an admitted sequence goes: its slot, the cached pages it reuses (and their hash
    chain), and how many pages it holds in all."""

    slot: int
    matched: list[int]
    chain: int
    need: int


def position_limit(seq: Sequence, max_seq_len: int) -> int:
    """The most positions the sequence can ever write."""
    return min(len(seq.prompt) + seq.max_tokens, max_seq_len)


def waits_for_prefix(seq: Sequence, running: Iterable[Sequence], paging: Paging | None) -> bool:
    """A prompt being computed now starts with full pages that `seq` could reuse once they
    are registered: it waits for them rather than computing them twice (n > 1 choices, a
    burst of requests with one system prompt)."""
    if paging is None or not paging.prefix_caching or seq.score_prompt:
        return False
    p = paging.page_size
    most = (seq.num_tokens - 1) // p  # pages a match can cover
    if most == 0:
        return False
    for r in running:
        # More pages in common than r has registered so far: one more page is enough to say.
        need = (r.hashed + 1) * p
        ready = r.prefilling and most > r.hashed and need <= r.prefill_end
        if ready and r.head(need) == seq.head(need):
            return True
    return False


def place(
    seq: Sequence,
    free_slots: Iterable[int],
    pools: list[PagePool],
    running: Iterable[Sequence],
    paging: Paging,
    drafts: int,
    max_seq_len: int,
) -> Placement | None:
    """The free slot whose dp group reuses the most of the sequence's pages, else has the most
    to spare; None when no group has pages for it (it waits, first in line)."""
    need = paging.needed(min(seq.num_tokens + 1 + drafts, position_limit(seq, max_seq_len)))
    tokens = seq.head(seq.num_tokens)
    growing = [0] * paging.dp  # running sequences that may still take a page
    for r in running:
        if r.capacity < position_limit(r, max_seq_len):
            growing[(r.slot or 0) % paging.dp] += 1
    best: Placement | None = None
    best_key = (-1, 0)
    seen: set[int] = set()
    for slot in free_slots:  # one look per dp group
        group = slot % paging.dp
        if group in seen:
            continue
        seen.add(group)
        pool = pools[group]
        matched, h = ([], 0) if seq.score_prompt else pool.match(tokens)
        # A page left for each growing sequence's next one: admitting into the last free
        # pages would only preempt the newcomer a few steps on (benchmarks/kv_pages.py).
        spare = pool.available(matched) - (need - len(matched)) - growing[group]
        key = (len(matched), spare)  # the most reuse, then the most room to grow
        if spare >= 0 and key > best_key:
            best, best_key = Placement(slot, matched, h, need), key
    return best
