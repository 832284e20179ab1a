"""The engine loop's speculative-decoding bookkeeping over a fake model that counts.

The fake main model predicts "last token + 1"; the fake MTP layer predicts "token + 1" (always
right) or "token + 2" (always wrong), or refuses its pass. The real scheduler, sampler, verifier
and wire messages run, so steps, drafts, acceptance and failures are known exactly.
"""

from __future__ import annotations

import pytest
import torch

from dsworker.engine.loop import EngineLoop, follow
from dsworker.engine.metrics import Metrics
from dsworker.engine.requests import GenRequest, Output, SamplingParams
from dsworker.engine.scheduler import Scheduler
from dsworker.engine.step_wire import DRAFT, HEARTBEAT, STEP, STOP, Message
from dsworker.engine.steps import DraftInput, Step, StepError, StepItem

VOCAB = 64


class Recorder:
    """A control channel that keeps what rank 0 would broadcast."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def recv(self) -> Message:  # pragma: no cover - rank 0 never receives
        raise AssertionError("rank 0 does not receive")


class CountingDrafter:
    device = torch.device("cpu")
    drafting = True

    def __init__(self, draft_offset: int = 1, refuse: bool = False, drafts: int = 1) -> None:
        self.draft_offset, self.refuse, self.drafts = draft_offset, refuse, drafts
        self.steps: list[Step] = []
        self.draft_calls: list[tuple[DraftInput, ...]] = []

    def run(self, step: Step) -> torch.Tensor:
        self.steps.append(step)
        rows = []
        for it in step.sampled:
            for tok in it.tokens[len(it.tokens) - 1 - it.drafts :]:
                row = torch.zeros(VOCAB)
                row[(tok + 1) % VOCAB] = 10.0
                rows.append(row)
        return torch.stack(rows) if rows else torch.zeros(0, VOCAB)

    def run_drafts(self, step: Step, inputs: tuple[DraftInput, ...]) -> dict[int, tuple[int, ...]]:
        self.draft_calls.append(inputs)
        if self.refuse:
            raise StepError("AllToAll buffer full")
        out = {}
        for d in inputs:
            first = d.last + self.draft_offset
            out[step.items[d.index].seq_id] = tuple((first + j) % VOCAB for j in range(self.drafts))
        return out

    def dropped_rows(self) -> int:
        return 0


def run(runner: CountingDrafter, max_tokens: int = 7) -> tuple[list[Output], Recorder, Metrics]:
    channel, metrics, outs = Recorder(), Metrics(), []
    scheduler = Scheduler(2, 64, 16, drafts=runner.drafts)
    loop = EngineLoop(runner, scheduler, str, channel, metrics)
    loop.submit(GenRequest([3, 4], SamplingParams(temperature=0.0), max_tokens), outs.append)
    loop.run_until_idle()
    return outs, channel, metrics


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_right_drafts_bring_two_tokens_a_step() -> None:
    runner = CountingDrafter(draft_offset=1)
    outs, channel, metrics = run(runner)
    assert [t for o in outs for t in o.token_ids] == [5, 6, 7, 8, 9, 10, 11]
    assert outs[-1].finish_reason == "length"
    # Prefill gives 5; then each step verifies one draft and adds a bonus: 4 steps in all.
    assert len(runner.steps) == 4
    assert [it.tokens for s in runner.steps[1:] for it in s.items] == [(5, 6), (7, 8), (9, 10)]
    assert sample(metrics, "dsworker_spec_draft_tokens_total") == 3
    assert sample(metrics, "dsworker_spec_accepted_tokens_total") == 3
    kinds = [m.kind for m in channel.sent]
    assert kinds[:2] == [STEP, DRAFT] and kinds.count(DRAFT) == kinds.count(STEP)
    assert channel.sent[1].drafts == (DraftInput(0, 2, 5),)  # prompt positions 0, 1 -> 4, 5


def test_wrong_drafts_cost_nothing_but_the_step() -> None:
    runner = CountingDrafter(draft_offset=2)
    outs, _, metrics = run(runner)
    assert [t for o in outs for t in o.token_ids] == [5, 6, 7, 8, 9, 10, 11]
    assert len(runner.steps) == 7
    assert sample(metrics, "dsworker_spec_accepted_tokens_total") == 0
    assert sample(metrics, "dsworker_spec_draft_tokens_total") == 6


def test_a_refused_draft_pass_fails_its_sequences_and_the_loop_goes_on() -> None:
    runner = CountingDrafter(refuse=True)
    outs, _, metrics = run(runner)
    assert outs[-1].error is not None and "AllToAll buffer full" in outs[-1].error
    assert sample(metrics, "dsworker_rejected_steps_total") == 1
    runner.refuse = False
    again, _, _ = run(runner, max_tokens=2)
    assert [t for o in again for t in o.token_ids] == [5, 6]


def test_three_right_drafts_bring_four_tokens_a_step() -> None:
    runner = CountingDrafter(draft_offset=1, drafts=3)
    outs, _, metrics = run(runner, max_tokens=9)
    assert [t for o in outs for t in o.token_ids] == list(range(5, 14))
    assert [it.tokens for s in runner.steps[1:] for it in s.items] == [
        (5, 6, 7, 8),
        (9, 10, 11, 12),
    ]
    assert sample(metrics, "dsworker_spec_accepted_tokens_total") == 6


class Script:
    """A control channel a follower reads: the messages rank 0 would have sent."""

    def __init__(self, *msgs: Message) -> None:
        self.msgs = list(msgs)

    def send(self, msg: Message) -> None:  # pragma: no cover - followers never send
        raise AssertionError("a follower does not send")

    def recv(self) -> Message:
        return self.msgs.pop(0)


def test_a_follower_runs_each_step_and_its_draft_pass_and_refuses_a_missing_one() -> None:
    step = Step((StepItem(0, 0, 0, (3, 4), True),))
    runner = CountingDrafter()
    inputs = (DraftInput(0, 2, 5),)
    follow(runner, Script(Message(STEP, step), Message(DRAFT, drafts=inputs), Message(STOP)))
    assert runner.steps == [step] and runner.draft_calls == [inputs]
    with pytest.raises(RuntimeError, match="expected the draft message, got kind 2"):
        follow(runner, Script(Message(STEP, step), Message(HEARTBEAT)))


def test_swapped_metrics_registry_counts_every_token() -> None:
    """`serve` warms up into a throwaway registry, then swaps in the real one: the tokens of
    later requests (and their latencies) land in the new registry, none in the old."""
    channel, warmup, real, outs = Recorder(), Metrics(), Metrics(), []
    loop = EngineLoop(CountingDrafter(), Scheduler(2, 64, 16, drafts=1), str, channel, warmup)
    loop.metrics = real
    loop.submit(GenRequest([3, 4], SamplingParams(temperature=0.0), 5), outs.append)
    loop.run_until_idle()
    assert sample(real, "dsworker_generation_tokens_total") == 5
    assert sample(real, "dsworker_time_to_first_token_seconds_count") == 1
    assert sample(real, "dsworker_prompt_tokens_total") == 2
    assert sample(warmup, "dsworker_generation_tokens_total") == 0
