"""The control channel over a real 2-process gloo group: short and long steps, heartbeat, stop."""

from __future__ import annotations

import torch.distributed as dist

from dsworker.engine.control import INLINE, DistChannel
from dsworker.engine.step_wire import HEARTBEAT, STEP, STOP, Message
from dsworker.engine.steps import Step, StepItem
from dsworker.parallel.groups import spawn_local

STEPS = [
    Step((StepItem(0, 1, 4, (7,), True), StepItem(5, 0, 9, (3,), True))),
    Step((StepItem(2, 3, 0, tuple(range(3 * INLINE)), True),)),  # needs the second broadcast
]


def _exchange(rank: int, nproc: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    channel = DistChannel()
    if rank == 0:
        for step in STEPS:
            channel.send(Message(STEP, step))
        channel.send(Message(HEARTBEAT))
        channel.send(Message(STOP))
        return
    got = [channel.recv() for _ in range(len(STEPS) + 2)]
    assert [m.step for m in got[: len(STEPS)]] == STEPS
    assert [m.kind for m in got[len(STEPS) :]] == [HEARTBEAT, STOP]


def test_control_messages_reach_the_other_rank_intact() -> None:
    spawn_local(2, _exchange)
