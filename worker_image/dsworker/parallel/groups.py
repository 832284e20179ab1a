"""Process groups of one model instance, built from the plan with layout.py's rank arithmetic.

Attention runs in dp groups of tp ranks (tp group = the ranks sharing a dp_rank); dense and
shared-expert MLPs use the same tp group; routed experts use moe_tp x moe_ep over the whole world
(moe_tp group = ranks sharing a moe_ep_rank, moe_ep group = ranks sharing a moe_tp_rank). `Group`
wraps the few collectives the model needs and skips them for groups of one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsworker.contract.parallel_plan import ParallelPlan, RankCoords
from dsworker.parallel.device import HOST_BACKEND, Device


class Group:
    """A process group (or none, for size 1) and this rank's place in it.

    Empty tensors skip communication: callers only pass them when every member's is empty (the
    tp members of a dp group run the same batch); world-wide MoE exchanges always pad to a row.
    """

    def __init__(self, ranks: list[int], rank: int, pg: Any = None) -> None:
        self.ranks = ranks
        self.size = len(ranks)
        self.rank = ranks.index(rank)
        self.pg = pg

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place."""
        if self.size > 1 and x.numel():
            dist.all_reduce(x, group=self.pg)
        return x

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1 and x.numel():
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.pg)
        return x

    def all_min(self, x: torch.Tensor) -> torch.Tensor:
        """Minimum over the group, in place (e.g. the KV slots every rank can hold)."""
        if self.size > 1 and x.numel():
            dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.pg)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors of every member along dim 0, in group order. A bool
        tensor travels as uint8: inductor's compiled all-gather of bool reads back wrong values."""
        if self.size == 1:
            return x
        if x.dtype == torch.bool:
            return self.all_gather(x.to(torch.uint8)) != 0
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        if not x.numel():
            return out
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.pg)
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, then keep this member's dim-0 block (dim 0 divisible by size)."""
        if self.size == 1:
            return x
        out = x.new_empty((x.shape[0] // self.size, *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x.contiguous(), group=self.pg)
        return out

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Block i of dim 0 goes to member i; block j of the result came from member j."""
        if self.size == 1:
            return x
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=self.pg)
        return out


@dataclass
class ParallelGroups:
    """Every group one rank takes part in; `cpu` is a gloo world group for host-side control."""

    plan: ParallelPlan
    coords: RankCoords
    world: Group
    tp: Group
    moe_tp: Group
    moe_ep: Group
    cpu: Group

    @property
    def rank(self) -> int:
        return self.coords.rank


def _grid(plan: ParallelPlan) -> dict[str, list[list[int]]]:
    """Member lists of every group kind, derived from plan.coords (one rule, used everywhere)."""
    cs = [plan.coords(r) for r in range(plan.world_size)]

    def by(key: Callable[[RankCoords], int]) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for c in cs:
            out.setdefault(key(c), []).append(c.rank)
        return [out[k] for k in sorted(out)]

    return {
        "tp": by(lambda c: c.dp_rank),
        "moe_tp": by(lambda c: c.moe_ep_rank),
        "moe_ep": by(lambda c: c.moe_tp_rank),
    }


def build_groups(plan: ParallelPlan, rank: int, backend: str) -> ParallelGroups:
    """Create the groups (collectively: every rank calls this in the same order)."""
    world_ranks = list(range(plan.world_size))
    multi = dist.is_initialized() and plan.world_size > 1
    made: dict[str, Group] = {}
    for kind, lists in _grid(plan).items():
        for members in lists:
            pg = dist.new_group(members) if multi and len(members) > 1 else None
            if rank in members:
                made[kind] = Group(members, rank, pg)
    world = Group(world_ranks, rank, dist.group.WORLD if multi else None)
    cpu = world
    if multi and backend != HOST_BACKEND:
        cpu = Group(world_ranks, rank, dist.new_group(world_ranks, backend=HOST_BACKEND))
    return ParallelGroups(
        plan, plan.coords(rank), world, made["tp"], made["moe_tp"], made["moe_ep"], cpu
    )


def init_process_group(device: Device, rank: int, world_size: int, timeout_s: float = 600) -> None:
    """torch.distributed from MASTER_ADDR/MASTER_PORT (env://), with the device's backend."""
    if world_size == 1 or dist.is_initialized():
        return
    kwargs: dict[str, Any] = device.init_kwargs()
    dist.init_process_group(
        device.backend,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )


def _entry(
    rank: int, nproc: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        # The parent serves the env:// store (torchrun's agent-store convention): every rank,
        # rank 0 included, joins as a client, whoever calls init_process_group.
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    try:
        fn(rank, nproc, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _end_rank()


def _end_rank() -> None:
    """End a rank that finished cleanly without the interpreter's teardown: there gloo's C++
    threads, still referenced from Python, can abort the process ("terminate called without an
    active exception", SIGABRT) after its work is done, and spawn would report a failed rank."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_local(nproc: int, fn: Callable[..., None], *args: Any) -> None:
    """Run fn(rank, nproc, *args) in nproc fresh processes on this host (one rank each).

    `fn` must be importable (spawn pickles it by name). A failing rank fails the call. The
    parent binds the rendezvous store on a kernel-chosen port first, so two worlds started at
    once on one host can never meet at the same port.
    """
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        mp.spawn(_entry, args=(nproc, store.port, fn, args), nprocs=nproc, join=True)
    finally:
        del store
