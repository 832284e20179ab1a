"""spawn_local: a rank that finished ends without the interpreter's teardown (gloo's threads could
abort it there), yet what it printed still arrives and a rank that raised still fails the call."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from dsworker.parallel.groups import spawn_local


def _sum_and_print(rank: int, nproc: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    t = torch.tensor([rank + 1])
    dist.all_reduce(t)
    print(f"rank {rank} summed {int(t)}", end="")  # no newline: left in the buffer unless flushed


def _fail_on_rank_one(rank: int, nproc: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=nproc)
    dist.barrier()
    if rank == 1:
        raise ValueError("boom on rank 1")


def test_finished_ranks_exit_cleanly_with_their_output_flushed(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the ranks' stdout block-buffered
    spawn_local(2, _sum_and_print)
    out = capfd.readouterr().out
    assert "rank 0 summed 3" in out and "rank 1 summed 3" in out, out


def test_a_rank_that_raises_still_fails_the_call() -> None:
    with pytest.raises(ProcessRaisedException, match="boom on rank 1"):
        spawn_local(2, _fail_on_rank_one)
