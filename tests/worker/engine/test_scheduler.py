"""Continuous batching policy: slots, chunked prefill, decode-first budgets, finish rules."""

from __future__ import annotations

import pytest

from dsworker.engine import step_wire
from dsworker.engine.kv_pages import PagePool, Paging
from dsworker.engine.scheduler import Scheduler, SchedulerError
from dsworker.engine.steps import DraftInput, FinishReason, Sequence, Step, StepItem


def seq(i: int, n_prompt: int, max_tokens: int = 4, eos: int | None = None) -> Sequence:
    stop = frozenset({eos}) if eos is not None else frozenset()
    return Sequence(i, list(range(10 + i, 10 + i + n_prompt)), max_tokens, stop_token_ids=stop)


def run_step(s: Scheduler, token: int = 7) -> tuple[Step, list]:
    step = s.schedule()
    assert step is not None
    events = s.update(step, {it.seq_id: [token] for it in step.sampled})
    return step, events


def mtp_reads(s: Scheduler, step: Step) -> list[tuple[int, tuple[int, ...]]]:
    """Per draft input: its step item and the tokens the MTP layer reads after its positions."""
    return [(d.index, d.tokens(step.items[d.index])) for d in s.draft_inputs(step)]


def test_a_draft_input_reads_no_more_positions_than_its_item_holds() -> None:
    item = StepItem(0, 0, 4, (5, 6), True, 1)
    assert DraftInput(0, 2, 9).tokens(item) == (6, 9)
    assert DraftInput(0, 1, 9).tokens(item) == (9,)
    with pytest.raises(ValueError, match="reads 1 to 2 positions of item 0, not 3"):
        DraftInput(0, 3, 9).tokens(item)


def test_prefill_then_decode_positions_and_slots() -> None:
    s = Scheduler(max_batch_size=2, max_seq_len=32, max_step_tokens=64)
    s.add(seq(0, 3))
    step, events = run_step(s, token=5)
    assert step.items == (StepItem(0, 0, 0, (10, 11, 12), True),)
    assert [(e.seq_id, e.token, e.finish_reason) for e in events] == [(0, 5, None)]
    step, _ = run_step(s, token=6)
    # Decode feeds the last sampled token at the next position, same slot.
    assert step.items == (StepItem(0, 0, 3, (5,), True),)
    step, _ = run_step(s)
    assert step.items == (StepItem(0, 0, 4, (6,), True),)


def test_max_tokens_finishes_with_length_and_frees_slot() -> None:
    s = Scheduler(max_batch_size=1, max_seq_len=32, max_step_tokens=64)
    s.add(seq(0, 2, max_tokens=2))
    s.add(seq(1, 2, max_tokens=1))
    run_step(s)
    _, events = run_step(s)
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert s.free_slots == s.free_slots.__class__([0])
    step, events = run_step(s)  # the waiting sequence gets the freed slot
    assert step.items[0].seq_id == 1 and step.items[0].slot == 0
    assert events[0].finish_reason is FinishReason.LENGTH
    assert not s.has_work


def test_a_stop_token_ends_only_the_sequences_that_have_it() -> None:
    """ignore_eos is the server leaving EOS out of a sequence's stop tokens."""
    s = Scheduler(max_batch_size=2, max_seq_len=32, max_step_tokens=64)
    s.add(seq(0, 2, max_tokens=10, eos=1))
    s.add(seq(1, 2, max_tokens=2))
    _, events = run_step(s, token=1)
    reasons = {e.seq_id: e.finish_reason for e in events}
    assert reasons == {0: FinishReason.STOP, 1: None}


def test_max_seq_len_caps_total_tokens() -> None:
    s = Scheduler(max_batch_size=1, max_seq_len=5, max_step_tokens=64)
    s.add(seq(0, 3, max_tokens=100))
    run_step(s)
    _, events = run_step(s)
    assert events[0].finish_reason is FinishReason.LENGTH
    with pytest.raises(SchedulerError, match="no room"):
        s.add(seq(1, 5))


def test_chunked_prefill_respects_budget_and_keeps_decodes_running() -> None:
    s = Scheduler(max_batch_size=4, max_seq_len=128, max_step_tokens=8)
    s.add(seq(0, 2, max_tokens=50))
    run_step(s)  # seq 0 now decoding
    s.add(seq(1, 20, max_tokens=3))
    step, events = run_step(s)
    # one decode token + 7 prompt tokens; the partial chunk samples nothing
    assert step.num_tokens == 8
    assert step.items[0] == StepItem(0, 0, 2, (7,), True)
    assert step.items[1].seq_id == 1 and step.items[1].start == 0
    assert len(step.items[1].tokens) == 7 and not step.items[1].sample
    assert [e.seq_id for e in events] == [0]
    step, _ = run_step(s)
    assert step.items[1].start == 7 and len(step.items[1].tokens) == 7
    step, events = run_step(s)
    assert step.items[1].start == 14 and len(step.items[1].tokens) == 6 and step.items[1].sample
    assert {e.seq_id for e in events} == {0, 1}


def test_batch_is_bounded_by_slots_and_fifo() -> None:
    s = Scheduler(max_batch_size=2, max_seq_len=64, max_step_tokens=64)
    for i in range(4):
        s.add(seq(i, 2, max_tokens=3))
    step, _ = run_step(s)
    assert [it.seq_id for it in step.items] == [0, 1]
    assert s.num_running == 2 and [q.seq_id for q in s.waiting] == [2, 3]


def test_finish_early_frees_slot_and_update_skips_it() -> None:
    s = Scheduler(max_batch_size=1, max_seq_len=64, max_step_tokens=64)
    s.add(seq(0, 2, max_tokens=10))
    s.add(seq(1, 2, max_tokens=10))
    step = s.schedule()
    assert step is not None
    gone = s.finish(0, FinishReason.ABORT)  # e.g. the client disconnected mid-forward
    assert gone is not None and gone.finish_reason is FinishReason.ABORT
    assert s.update(step, {0: [3]}) == []
    assert s.finish(1, FinishReason.ABORT) is not None  # waiting ones can be dropped too
    assert not s.has_work and list(s.free_slots) == [0]


def test_rejects_bad_sequences() -> None:
    s = Scheduler(max_batch_size=1, max_seq_len=8, max_step_tokens=8)
    with pytest.raises(SchedulerError, match="empty"):
        s.add(Sequence(0, [], 1))
    with pytest.raises(SchedulerError, match="max_tokens"):
        s.add(Sequence(0, [1], 0))
    s.add(Sequence(0, [1], 1))
    with pytest.raises(SchedulerError, match="already"):
        s.add(Sequence(0, [1], 1))
    assert s.schedule() is not None


def test_idle_scheduler_has_no_step() -> None:
    assert Scheduler(1, 8, 8).schedule() is None


def test_step_wire_round_trip() -> None:
    step = Step(
        (
            StepItem(3, 1, 0, (5, 6, 7), False, 0, (4, 9), 3),
            StepItem(9, 0, 12, (2, 8), True, 1),
            StepItem(4, 2, 0, (1, 2), True, 0, (), 1),
        )
    )
    msg = step_wire.Message(step_wire.STEP, step)
    assert step_wire.decode(step_wire.encode(msg)) == msg
    drafts = step_wire.Message(step_wire.DRAFT, drafts=(DraftInput(0, 3, 9), DraftInput(1, 1, 8)))
    assert step_wire.decode(step_wire.encode(drafts)) == drafts
    assert step_wire.decode(step_wire.encode(step_wire.Message(step_wire.DRAFT))).drafts == ()
    with pytest.raises(step_wire.WireError, match="1 drafts, 0 prompt rows, 1 tokens"):
        step_wire.decode([step_wire.STEP, 1, 3, 1, 0, 1, 1, 1, 0, 0, 5])
    with pytest.raises(step_wire.WireError, match="0 drafts, 2 prompt rows, 2 tokens"):
        step_wire.decode([step_wire.STEP, 1, 3, 1, 0, 2, 1, 0, 2, 0, 5, 6])
    with pytest.raises(step_wire.WireError, match="4 values for 1 draft inputs"):
        step_wire.decode([step_wire.DRAFT, 1, 0, 3, 5, 6])
    for bad in ([step_wire.DRAFT, 1, 0, 0, 5], [step_wire.DRAFT, 1, -1, 1, 5]):
        with pytest.raises(step_wire.WireError, match="negative index or no positions"):
            step_wire.decode(bad)
    for kind in (step_wire.HEARTBEAT, step_wire.STOP):
        assert step_wire.decode(step_wire.encode(step_wire.Message(kind))).kind == kind
    with pytest.raises(step_wire.WireError):
        step_wire.decode([step_wire.STEP, 1, 3, 1, 0, 5, 0, 1, 0])
    with pytest.raises(step_wire.WireError):
        step_wire.decode([42, 0])


def test_drafts_ride_behind_the_last_token_and_verification_sets_the_cache() -> None:
    """Accepted: both positions stay cached; rejected: the draft's entry is left to overwrite."""
    s = Scheduler(max_batch_size=2, max_seq_len=32, max_step_tokens=64)
    s.add(seq(0, 3, max_tokens=10))
    step, _ = run_step(s, token=5)
    # The last chunk: the MTP reads positions 0..2 with the token after each (the sampled 5 last).
    assert mtp_reads(s, step) == [(0, (11, 12, 5))]
    s.set_drafts({0: (6,)})
    step = s.schedule()
    assert step is not None and step.items == (StepItem(0, 0, 3, (5, 6), True, 1),)
    assert step.num_tokens == 2 and step.items[0].verify_rows == 2
    events = s.update(step, {0: [6, 9]})  # draft 6 accepted, 9 is the main model's next
    assert [e.token for e in events] == [6, 9]
    assert s.running[0].num_cached == 5 and s.running[0].drafts == ()
    assert mtp_reads(s, step) == [(0, (6, 9))]
    s.set_drafts({0: (4,)})
    step = s.schedule()
    assert step is not None and step.items == (StepItem(0, 0, 5, (9, 4), True, 1),)
    s.update(step, {0: [2]})  # draft 4 rejected: the main model said 2
    assert s.running[0].num_cached == 6 and s.running[0].output == [5, 6, 9, 2]
    assert mtp_reads(s, step) == [(0, (2,))]
    step = s.schedule()  # no draft set: a plain decode step
    assert step is not None and step.items == (StepItem(0, 0, 6, (2,), True, 0),)
    with pytest.raises(SchedulerError, match="2 tokens for an item with 0 drafts"):
        s.update(step, {0: [1, 2]})


def test_draft_inputs_of_prompt_chunks_and_finished_sequences() -> None:
    s = Scheduler(max_batch_size=2, max_seq_len=64, max_step_tokens=4)
    s.add(seq(0, 6, max_tokens=1))
    step, _ = run_step(s)
    # A mid-prompt chunk pairs its last position with the next chunk's first prompt token.
    assert step.items[0].tokens == (10, 11, 12, 13)
    assert mtp_reads(s, step) == [(0, (11, 12, 13, 14))]
    s.set_drafts({0: (3,)})  # still prefilling: a draft now would be a guess at a prompt token
    assert s.running[0].drafts == ()
    step, events = run_step(s)
    assert events[0].finish_reason is FinishReason.LENGTH
    assert s.draft_inputs(step) == ()  # finished: nothing left to draft for


def test_tokens_past_a_finish_are_dropped() -> None:
    s = Scheduler(max_batch_size=1, max_seq_len=32, max_step_tokens=64)
    s.add(seq(0, 2, max_tokens=10, eos=1))
    run_step(s, token=5)
    s.set_drafts({0: (1,)})
    step = s.schedule()
    assert step is not None
    events = s.update(step, {0: [1, 7]})  # the accepted draft is EOS: 7 never appears
    assert [(e.token, e.finish_reason) for e in events] == [(1, FinishReason.STOP)]
    s.add(seq(1, 2, max_tokens=2))
    run_step(s, token=5)
    s.set_drafts({1: (6,)})
    step = s.schedule()
    assert step is not None
    events = s.update(step, {1: [6, 7]})  # max_tokens 2 reached at the draft
    assert [(e.token, e.finish_reason) for e in events] == [(6, FinishReason.LENGTH)]


def test_the_step_budget_holds_a_full_batch_of_drafted_decodes() -> None:
    assert Scheduler(4, 32, 3).max_step_tokens == 4
    s = Scheduler(2, 32, 3, drafts=1)
    assert s.max_step_tokens == 4
    s.add(seq(0, 2, max_tokens=10))
    s.add(seq(1, 2, max_tokens=10))
    run_step(s, token=5)
    s.set_drafts({0: (6,), 1: (6,)})
    step = s.schedule()
    assert step is not None and [len(it.tokens) for it in step.items] == [2, 2]


PAGINGS = {
    "slots": None,
    "pages": Paging(page_size=4, pages=20),
    "one-sequence-of-pages": Paging(page_size=4, pages=8),  # preempts often
    "dp2-tight": Paging(page_size=4, pages=9, dp=2),
}


@pytest.mark.parametrize("paging", PAGINGS.values(), ids=PAGINGS.keys())
@pytest.mark.parametrize("seed", range(5))
def test_invariants_under_random_traffic_with_drafts(seed: int, paging: Paging | None) -> None:
    """Random arrivals, prompt lengths, drafts, acceptance and aborts: every step stays inside
    the cache and the budget, feeds each sequence exactly its next positions (a preempted one
    its whole history again), the pages a step writes are the ones its items announced, and
    every sequence ends within its limits, each token sent once."""
    random_traffic(seed, paging)


def test_tight_random_traffic_does_preempt() -> None:
    """The invariants above were checked across preemptions, not around them."""
    for name in ("one-sequence-of-pages", "dp2-tight"):
        assert sum(random_traffic(seed, PAGINGS[name]) for seed in range(5)) >= 3, name


def pages_short(s: Scheduler) -> tuple[list[int], list[int], int]:
    """Per dp group: pages decoding sequences lack for their next token, and pages available;
    and the preemptions so far."""
    if s.paging is None:
        return [], [], s.preemptions
    short = [0] * s.paging.dp
    for q in s.running.values():
        if not q.prefilling:
            short[q.slot % s.paging.dp] += max(0, s.paging.needed(q.num_tokens) - len(q.pages))
    return short, [pool.available(()) for pool in s.pools], s.preemptions


def random_traffic(seed: int, paging: Paging | None) -> int:
    """The random-traffic run, its invariants asserted; the preemptions it saw."""
    import random

    rng = random.Random(seed)
    max_seq_len, batch, budget = 32, 4, 12
    s = Scheduler(batch, max_seq_len, budget, drafts=3, paging=paging)
    tables: dict[int, tuple[int, ...]] = {}  # slot -> pages, as a rank's cache has them
    seqs: dict[int, Sequence] = {}
    emitted: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(400):
        if next_id < 40 and rng.random() < 0.3:
            n = rng.randint(1, 20)
            seq_ = Sequence(next_id, [rng.randrange(50) for _ in range(n)], rng.randint(1, 20))
            s.add(seq_)
            seqs[next_id], emitted[next_id] = seq_, []
            next_id += 1
        if s.running and rng.random() < 0.05:
            s.finish(rng.choice(list(s.running)), FinishReason.ABORT)
        short, free, preempted = pages_short(s)
        step = s.schedule()
        if s.preemptions > preempted:  # only when next tokens lack pages, never for drafts
            assert any(n > f for n, f in zip(short, free, strict=True))
        if step is None:
            continue
        assert step.num_tokens <= s.max_step_tokens
        assert len({it.slot for it in step.items}) == len(step.items)
        for it in step.items:
            seq_ = s.running[it.seq_id]
            assert it.start == seq_.num_cached and it.slot == seq_.slot
            assert it.tokens and it.start + len(it.tokens) <= max_seq_len
            if paging is not None:
                if it.pages:
                    tables[it.slot] = it.pages
                assert tables[it.slot] == seq_.pages
                assert it.start + len(it.tokens) <= len(seq_.pages) * paging.page_size
            if it.sample:
                assert it.start + len(it.tokens) - it.drafts == seq_.num_tokens
            real = len(it.tokens) - it.drafts
            assert list(it.tokens[:real]) == [
                seq_.token_at(p) for p in range(it.start, it.start + real)
            ]
            assert list(it.tokens[real:]) == list(seq_.drafts[: it.drafts])
        sampled = {
            it.seq_id: [rng.randrange(50) for _ in range(1 + rng.randint(0, it.drafts))]
            for it in step.sampled
        }
        for it in step.sampled:  # accepted drafts are the drafts themselves
            accepted = len(sampled[it.seq_id]) - 1
            sampled[it.seq_id][:accepted] = it.tokens[len(it.tokens) - it.drafts :][:accepted]
        for ev in s.update(step, sampled):
            emitted[ev.seq_id].append(ev.token)
        inputs = s.draft_inputs(step)
        for d in inputs:
            it = step.items[d.index]
            seq_ = s.running[it.seq_id]
            assert it.start + d.count <= seq_.num_cached
            assert list(d.tokens(it)) == [
                seq_.token_at(p + 1) for p in range(it.start, it.start + d.count)
            ]
        s.set_drafts(
            {step.items[d.index].seq_id: tuple(rng.randrange(50) for _ in range(3)) for d in inputs}
        )
        for seq_ in s.running.values():
            if not seq_.prefilling:
                assert seq_.num_cached == seq_.num_tokens - 1  # the last token is fed next
        assert len(s.free_slots) + len(s.running) == batch
        if paging is not None:
            for g, pool in enumerate(s.pools):
                held = [pg for q in s.running.values() if q.slot % paging.dp == g for pg in q.pages]
                assert len(held) == len(set(held)) or paging.prefix_caching
                assert len(pool.free) + len(pool.idle) + len(pool.refs) == paging.pages
    while s.has_work:  # drain: no new traffic, every draft accepted
        step = s.schedule()
        assert step is not None
        for ev in s.update(
            step,
            {it.seq_id: list(it.tokens[len(it.tokens) - it.drafts :]) + [7] for it in step.sampled},
        ):
            emitted[ev.seq_id].append(ev.token)
    for i, seq_ in seqs.items():
        assert seq_.finish_reason is not None
        assert len(seq_.output) <= seq_.max_tokens and seq_.num_tokens <= max_seq_len
        assert emitted[i] == seq_.output
    return s.preemptions


def test_paging_takes_pages_as_tokens_come_and_frees_them_at_the_end() -> None:
    s = Scheduler(4, 32, 64, paging=Paging(page_size=4, pages=10))
    s.add(seq(0, 5, max_tokens=3))  # prompt and first token: 6 positions, 2 pages
    s.add(seq(1, 3, max_tokens=10))  # 4 positions: 1 page
    # 28 positions: 7 pages, and one to spare for each of the two running: 9 of 7 left: waits
    s.add(seq(2, 27, max_tokens=1))
    step, _ = run_step(s)
    assert [(it.seq_id, it.pages) for it in step.items] == [(0, (0, 1)), (1, (2,))]
    assert [q.seq_id for q in s.waiting] == [2]  # first in line: nothing overtakes it
    assert s.running[0].capacity == 8 and s.running[1].capacity == 4
    step, _ = run_step(s)  # seq 1 writes position 3, the last of its page
    assert all(it.pages == () for it in step.items)  # unchanged pages are not sent again
    step, _ = run_step(s)  # seq 1's position 4 needs a second page: the whole table goes out
    assert [(it.seq_id, it.pages) for it in step.items] == [(0, ()), (1, (2, 3))]
    assert s.running[1].capacity == 8
    assert 0 not in s.running  # 3 tokens: done, its pages are back
    step, _ = run_step(s)  # 10 - 2 = 8 free pages: 7 for seq 2, one to spare for seq 1
    [new] = [it for it in step.items if it.seq_id == 2]
    assert len(new.pages) == 7 and new.start == 0 and 3 not in new.pages


def test_admission_spares_a_page_only_for_sequences_that_may_still_grow() -> None:
    """Short requests whose every position fits their first page need nothing to spare: four
    of them fill four pages at once; requests that may grow leave a page each."""
    short = Scheduler(4, 16, 64, paging=Paging(page_size=16, pages=4))
    for i in range(4):
        short.add(seq(i, 5, max_tokens=8))  # 13 positions at most: one page, never more
    run_step(short)
    assert short.num_running == 4
    long = Scheduler(4, 16, 64, paging=Paging(page_size=4, pages=4))
    for i in range(4):
        long.add(seq(i, 2, max_tokens=8))  # one page now, up to three later
    run_step(long)
    assert long.num_running == 2  # the third would need 1 + 2 spare of the 2 left


def test_the_newest_sequence_is_preempted_when_pages_run_out_and_recomputed_later() -> None:
    """Out of pages for an older sequence's next token: the one that started last gives its
    pages back, waits first in line, and on its return computes prompt and output again
    without sampling, then decodes on from its last token: no token is sent twice."""
    s = Scheduler(2, 16, 64, paging=Paging(page_size=4, pages=4, prefix_caching=False))
    s.add(Sequence(0, [1, 2, 3], 12))
    s.add(Sequence(1, [4, 5, 6], 12))
    tokens: dict[int, list[int]] = {0: [], 1: []}

    def step_with(token_of: dict[int, int]) -> Step:
        step = s.schedule()
        assert step is not None
        for ev in s.update(step, {it.seq_id: [token_of[it.seq_id]] for it in step.sampled}):
            tokens[ev.seq_id].append(ev.token)
        return step

    for t in range(6):  # each reaches 9 tokens in two pages: the pool is full
        step_with({0: 20 + t, 1: 40 + t})
    assert [len(s.running[i].pages) for i in (0, 1)] == [2, 2] and s.preemptions == 0
    step = step_with({0: 26, 1: 46})  # seq 0 needs a third page: seq 1 (newer) goes
    assert [it.seq_id for it in step.items] == [0] and s.preemptions == 1
    assert [q.seq_id for q in s.waiting] == [1] and s.waiting[0].num_cached == 0
    assert s.running[0].capacity == 12
    while 0 in s.running:  # seq 1 needs 3 pages to come back: it waits for seq 0's end
        step = step_with({0: 30, 1: 99})
        assert [it.seq_id for it in step.items] == [0]
    assert tokens[0] == [20, 21, 22, 23, 24, 25, 26] + [30] * 5
    step = step_with({1: 99})  # back: positions 0..7 again, nothing sampled
    [item] = step.items
    assert (item.start, item.tokens, item.sample) == (0, (4, 5, 6, *range(40, 45)), False)
    assert len(item.pages) == 3 and tokens[1] == [40, 41, 42, 43, 44, 45]
    step = step_with({1: 47})  # decodes on from its last token at its position
    assert step.items[0].start == 8 and step.items[0].tokens == (45,)
    assert tokens[1] == [40, 41, 42, 43, 44, 45, 47]


def test_a_sequence_with_no_one_newer_preempts_itself() -> None:
    s = Scheduler(2, 8, 64, paging=Paging(page_size=2, pages=4, prefix_caching=False))
    s.add(Sequence(0, [1, 2, 3], 5))  # 4 positions: 2 pages
    s.add(Sequence(1, [4, 5, 6], 5))  # 2 pages: the pool is full
    run_step(s)
    s.finish(0, FinishReason.ABORT)
    s.add(Sequence(2, [7], 5))  # 1 page; seq 1 now the oldest
    run_step(s)  # seq 1 writes position 3; seq 2 starts
    assert s.pools[0].available(()) == 1
    run_step(s)  # seq 1 takes the last page for position 4; seq 2 fits in its own page
    step = s.schedule()  # seq 2 needs position 2: no page, and it is the newest: it waits
    assert step is not None and [it.seq_id for it in step.items] == [1]
    assert [q.seq_id for q in s.waiting] == [2] and s.preemptions == 1


def test_a_returning_sequence_whose_pages_are_all_cached_decodes_at_once() -> None:
    s = Scheduler(2, 8, 64, paging=Paging(page_size=2, pages=4))
    s.add(Sequence(0, [1], 7))  # 1 page
    s.add(Sequence(1, [2, 3, 4], 5))  # 2 pages, one left
    run_step(s, token=5)
    run_step(s, token=6)  # seq 1: positions 0..3 cached, both pages registered
    step, _ = run_step(s, token=7)  # seq 0 takes the last page; seq 1 has none: it goes
    assert [it.seq_id for it in step.items] == [0] and s.preemptions == 1
    s.finish(0, FinishReason.ABORT)
    step = s.schedule()  # seq 1's two pages are still cached: no position to compute again
    assert step is not None
    [item] = step.items
    assert (item.seq_id, item.start, item.tokens, item.sample) == (1, 4, (6,), True)
    assert len(item.pages) == 3 and s.reused_tokens == 0  # its own pages: no prefix-cache hit


def test_a_newcomer_goes_to_the_dp_group_with_room_to_grow() -> None:
    """Equal reuse (none): the group with the most pages to spare, not the first free slot's,
    so the newcomer is not preempted there a few steps on."""
    s = Scheduler(4, 8, 64, paging=Paging(page_size=2, pages=4, dp=2, prefix_caching=False))
    for i in range(4):
        s.add(Sequence(i, [1], 7))
    run_step(s)
    for i in (2, 1, 3):  # group 1 empties; slot 2 (group 0) is first in the free list
        s.finish(i, FinishReason.ABORT)
    assert s.free_slots[0] % 2 == 0
    s.add(Sequence(4, [1], 7))
    run_step(s)
    assert s.running[4].slot % 2 == 1
    for _ in range(6):
        run_step(s)
    assert s.preemptions == 0


def test_a_sequence_scoring_its_prompt_is_not_preempted_mid_prompt() -> None:
    """Its prompt rows are half sent: the older sequence needing a page preempts itself instead,
    and comes back once the scoring one has ended."""
    s = Scheduler(2, 8, 2, paging=Paging(page_size=2, pages=6, prefix_caching=False))
    s.add(Sequence(0, [1], 7))  # 1 page
    run_step(s)
    s.add(Sequence(1, [3, 4, 5, 6, 7, 8, 9], 1, score_prompt=True))  # 4 pages, one left
    rows = 0
    while s.preemptions == 0:
        step, _ = run_step(s)  # one decode and a one-token chunk of the prompt per step
        rows += sum(it.prompt_rows for it in step.items if it.seq_id == 1)
    assert [q.seq_id for q in s.waiting] == [0] and s.running[1].prefilling
    while 1 in s.running:
        step, _ = run_step(s)
        rows += sum(it.prompt_rows for it in step.items if it.seq_id == 1)
    assert rows == 6  # each prompt token after the first scored once
    step, _ = run_step(s)
    assert [it.seq_id for it in step.items] == [0] and step.items[0].start == 0


def test_paging_bounds_drafts_by_the_positions_a_sequence_can_reach() -> None:
    s = Scheduler(1, 32, 64, drafts=3, paging=Paging(page_size=4, pages=8))
    s.add(seq(0, 3, max_tokens=5))  # at most 8 positions: its pages grow to 2, no more
    run_step(s, token=5)
    s.set_drafts({0: (6, 7, 8)})
    step = s.schedule()
    assert step is not None and step.items[0].tokens == (5, 6, 7, 8)  # positions 3..6 < 8
    s.update(step, {0: [6, 7, 4]})  # two drafts kept: 7 tokens, the last at position 6
    s.set_drafts({0: (9, 9, 9)})
    step = s.schedule()
    assert step is not None and step.items[0].tokens == (4, 9)  # position 7 is the last one
    assert step.items[0].drafts == 1


def test_paging_needs_room_for_one_full_sequence() -> None:
    with pytest.raises(SchedulerError, match="less than one sequence of max_seq_len 32"):
        Scheduler(2, 32, 64, paging=Paging(page_size=4, pages=7))


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_pages_are_written_by_one_sequence_only_under_random_traffic(caching: bool) -> None:
    """Without prefix caching no page is ever shared; with it, only registered (full, final)
    pages are, and no step writes into a registered page."""
    import random

    rng = random.Random(7)
    paging = Paging(page_size=4, pages=12, dp=2, prefix_caching=caching)
    s = Scheduler(4, 24, 16, drafts=2, paging=paging)
    for i in range(60):  # few distinct prompts, so prefixes repeat
        s.add(Sequence(i, [1, 2, 3, 4, 5][: rng.randint(1, 5)] * rng.randint(1, 3), 6))
    while s.has_work:
        step = s.schedule()
        assert step is not None
        for it in step.items:
            q = s.running[it.seq_id]
            pool = s.pools[it.slot % 2]
            end = it.start + len(it.tokens)
            assert end <= q.capacity
            for index in range(it.start // 4, (end - 1) // 4 + 1):
                assert q.pages[index] not in pool.hash_of, "a step writes into a registered page"
        users: dict[tuple[int, int], int] = {}
        for q in s.running.values():
            for pg in q.pages:
                users[(q.slot % 2, pg)] = users.get((q.slot % 2, pg), 0) + 1
        for (group, pg), n in users.items():
            assert n == 1 or (caching and pg in s.pools[group].hash_of)
        s.update(  # some drafts kept, then the model's own token
            step,
            {
                it.seq_id: [
                    *it.tokens[len(it.tokens) - it.drafts :][: rng.randint(0, it.drafts)],
                    3,
                ]
                for it in step.sampled
            },
        )
        s.drafted(step, s.draft_inputs(step))  # as the engine does after the MTP pass
        s.set_drafts({q.seq_id: (rng.randint(1, 5), 4) for q in s.running.values()})
        for g, pool in enumerate(s.pools):
            held = {pg for q in s.running.values() if q.slot % 2 == g for pg in q.pages}
            assert len(pool.free) + len(pool.idle) + len(pool.refs) == 12
            assert held == set(pool.refs) and not held & (set(pool.free) | set(pool.idle))
    assert (s.reused_tokens > 0) == caching


def test_prefix_caching_reuses_the_full_pages_of_an_earlier_prompt() -> None:
    s = Scheduler(2, 32, 64, paging=Paging(page_size=4, pages=16))
    first = Sequence(0, list(range(10)), 2)
    s.add(first)
    run_step(s, token=50)  # prompt positions 0..9: pages 0 and 1 are full and registered
    pool = s.pools[0]
    assert [pool.hash_of.get(pg) is not None for pg in first.pages] == [True, True, False]
    s.add(Sequence(1, [*range(9), 77, 78], 2))  # the same first 9 tokens: 2 pages reused
    step = s.schedule()
    assert step is not None
    [item] = [it for it in step.items if it.seq_id == 1]
    assert item.start == 8 and item.tokens == (8, 77, 78)
    shared = first.pages[:2]
    assert item.pages[:2] == shared and item.pages[2] not in first.pages
    assert s.reused_tokens == 8
    s.update(step, {it.seq_id: [5] for it in step.sampled})
    s.finish(0, FinishReason.ABORT)
    assert not set(shared) & set(pool.idle)  # still in use by sequence 1
    s.finish(1, FinishReason.ABORT)
    assert set(pool.idle) >= set(shared)  # kept for later prompts
    s.add(Sequence(2, list(range(8)), 2))  # exactly two pages: the last token is computed again
    step = s.schedule()
    assert step is not None and step.items[0].start == 4  # one page reused, one recomputed


def test_idle_pages_are_taken_last_and_forgotten_when_reused() -> None:
    s = Scheduler(1, 16, 64, paging=Paging(page_size=4, pages=4))
    s.add(Sequence(0, list(range(9)), 1))
    run_step(s)  # pages 0, 1 registered; the sequence ends (max_tokens 1)
    pool = s.pools[0]
    assert len(pool.idle) == 2 and len(pool.by_hash) == 2
    s.add(Sequence(1, [40 + i for i in range(13)], 1))  # 14 positions: 4 pages, idle ones too
    run_step(s)
    assert len(pool.by_hash) == 3  # the two idle pages went back to work: new content
    s.add(Sequence(2, list(range(9)), 1))
    step = s.schedule()
    assert step is not None and step.items[0].start == 0  # the old prompt is gone


def test_idle_chains_lose_their_last_pages_first() -> None:
    """A page is only reachable through the ones before it: evicting a chain's head would
    strand the rest, so the tail goes first and the shared head stays matchable."""
    pool = PagePool(5, 4)
    pages = pool.take([], 4)
    h = 0
    for pg in pages:
        h = pool.chain(h, [pg] * 4)
        pool.register(pg, h)
    pool.release(pages)
    assert list(pool.idle) == pages[::-1]
    taken = pool.take([], 2)  # the free page, then the oldest idle one: the chain's last
    assert taken == [4, pages[-1]]
    matched, _ = pool.match([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [9])
    assert matched == pages[:3]


def test_page_keys_are_keyed_digests_of_the_whole_prefix() -> None:
    a = PagePool.chain(0, [1, 2, 3])
    assert a == PagePool.chain(0, [1, 2, 3]) and a != PagePool.chain(0, [1, 2, 4])
    assert PagePool.chain(a, [5]) != PagePool.chain(PagePool.chain(0, [1, 2, 4]), [5])
    assert a != hash((0, (1, 2, 3))) and a.bit_length() > 64


def test_with_mtp_a_page_is_shared_once_the_mtp_pass_covered_it_and_the_token_after() -> None:
    """The MTP layer's entry at position p read token p + 1: a page is registered only after
    the draft pass wrote its entries, under a key that covers the token after it."""
    s = Scheduler(2, 32, 64, drafts=1, paging=Paging(page_size=4, pages=16))
    pool = s.pools[0]
    s.add(Sequence(0, list(range(9)), 1))  # ends at its first token: no draft pass follows
    run_step(s, token=50)
    assert pool.by_hash == {}
    s.add(Sequence(1, list(range(9)), 3))
    step, _ = run_step(s, token=50)
    assert pool.by_hash == {}  # main entries written, MTP ones not yet
    s.drafted(step, s.draft_inputs(step))  # positions 0..8 read, with tokens 1..8 and 50
    assert len(pool.by_hash) == 2
    # Same 8 tokens but a different 9th: page 1's last MTP entry read token 8, so only page 0
    # (whose lookahead token 4 agrees) is reused.
    s.add(Sequence(2, [*range(8), 77, 78], 2))
    step = s.schedule()
    assert step is not None
    [item] = [it for it in step.items if it.seq_id == 2]
    assert item.start == 4 and s.running[2].mtp_cached == 4


@pytest.mark.parametrize("caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_identical_prompts_arriving_together_compute_their_pages_once(caching: bool) -> None:
    """n > 1 choices: the second waits one step for the first's pages instead of computing
    them beside it (without prefix caching there is nothing to wait for)."""
    s = Scheduler(4, 32, 64, paging=Paging(page_size=4, pages=16, prefix_caching=caching))
    prompt = list(range(9))
    s.add(Sequence(0, prompt, 3))
    s.add(Sequence(1, prompt, 3))
    s.add(Sequence(2, [50, *prompt[1:]], 3))  # another first page: not held
    step, _ = run_step(s, token=60)
    assert [(it.seq_id, it.start) for it in step.items] == (
        [(0, 0), (2, 0)] if caching else [(0, 0), (1, 0), (2, 0)]
    )
    assert [q.seq_id for q in s.waiting] == ([1] if caching else [])  # held, still first in line
    if caching:
        step = s.schedule()
        assert step is not None
        assert [(it.seq_id, it.start, len(it.tokens)) for it in step.items if it.seq_id == 1] == [
            (1, 8, 1)
        ]
        assert s.reused_tokens == 8


def test_kv_usage_counts_held_pages_not_idle_prefix_pages() -> None:
    s = Scheduler(2, 32, 64, paging=Paging(page_size=4, pages=8, dp=2))
    s.add(Sequence(0, list(range(9)), 2))  # 11 positions: 3 pages of group 0's 8
    assert s.kv_usage == 0.0
    run_step(s)
    assert s.kv_usage == 3 / 16
    s.finish(0, FinishReason.STOP)  # two full pages stay idle for prefix caching
    assert s.kv_usage == 0.0 and len(s.pools[0].idle) == 2
    slots = Scheduler(4, 32, 64)
    slots.add(Sequence(0, [1, 2], 2))
    run_step(slots)
    assert slots.kv_usage == 0.25
