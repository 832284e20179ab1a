"""Build one serving rank from the engine config: device, torch.distributed, process groups, the
model, its weights, the KV cache sized within npuMemSize (agreed over the ranks), the decode graphs
and the control channel; what comes out is a `ModelRunner` ready for steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dsworker.contract.engine_config import EngineConfig
from dsworker.contract.kv_budget import (
    KVBudgetError,
    KVPages,
    kv_bytes,
    pages_for,
    plan_kv_pages,
    wanted_slots,
)
from dsworker.contract.layout import ParallelPlan
from dsworker.engine.control import Channel, DistChannel, LocalChannel
from dsworker.engine.kv_pages import Paging
from dsworker.engine.loader import load_weights
from dsworker.engine.model_runner import ModelRunner
from dsworker.engine.scheduler import Scheduler
from dsworker.model import DeepseekModel, EngineOptions, KVCache, ModelArgs, MoEOptions
from dsworker.model.decode_graphs import DecodeGraphs
from dsworker.parallel.device import Device
from dsworker.parallel.device_graphs import graph_api
from dsworker.parallel.groups import Group, ParallelGroups, build_groups, init_process_group

log = logging.getLogger("dsworker.engine.rank_setup")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Loaded:
    """A rank ready to run: the runner, the control channel and how loading went."""

    runner: ModelRunner
    channel: Channel
    load_seconds: float
    load_bytes: int
    max_batch_size: int  # the scheduler's slots (maxBatchSize)
    paging: Paging  # the KV pages each dp group has, which the scheduler hands out

    def scheduler(self, cfg: EngineConfig) -> Scheduler:
        """Rank 0's scheduler for this rank's cache: its slots, pages and MTP drafts."""
        return Scheduler(
            self.max_batch_size,
            cfg.maxSeqLen,
            cfg.maxPrefillTokens,
            drafts=self.runner.draft_tokens,
            paging=self.paging,
        )

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def engine_options(cfg: EngineConfig) -> EngineOptions:
    """The engine's MoE/MTP options from the engine config's MindIE-named keys."""
    moe = MoEOptions(
        ep_level=cfg.ep_level,
        routing_cutoff=cfg.topk_scaling_factor if cfg.enable_init_routing_cutoff else None,
        buffer_scale_factors=tuple(
            (int(t), float(f)) for t, f in cfg.alltoall_ep_buffer_scale_factors
        ),
        grouped_matmul=cfg.use_grouped_matmul,
    )
    return EngineOptions(moe=moe, mtp=cfg.mtp)


def fixed_shape_mode(cfg: EngineConfig, device_type: str) -> tuple[bool, str | None] | None:
    """(capture, compile backend) of the decode steps, or None where they run eagerly: with a
    routing cutoff (it drops rows by the data), or with neither capture nor compile to gain.
    Every world size and MTP take them, compiled with their collectives traced."""
    capture = cfg.cudaGraphs and device_type != "cpu" and graph_api(device_type) is not None
    if cfg.enable_init_routing_cutoff or not (capture or cfg.torchCompile):
        return None
    return capture, "inductor" if cfg.torchCompile else None


def fixed_shape_decode(
    model: DeepseekModel, cache: KVCache, cfg: EngineConfig, max_batch: int
) -> DecodeGraphs | None:
    """Graphed and/or compiled decode (and MTP draft) steps where `fixed_shape_mode` has them."""
    mode = fixed_shape_mode(cfg, model.device.type)
    if mode is None:
        return None
    capture, backend = mode
    return DecodeGraphs(
        model,
        cache,
        max_batch,
        capture=capture,
        compile_backend=backend,
        draft_tokens=cfg.num_speculative_tokens,
    )


def build_runner(
    model_dir: str | Path,
    cfg: EngineConfig,
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int = 1,
) -> Loaded:
    """Device, torch.distributed, groups, model, weights and KV cache of one rank."""
    if world_size != cfg.worldSize:
        raise ValueError(f"WORLD_SIZE {world_size} but the engine config says {cfg.worldSize}")
    device = Device.create(cfg.device, local_rank)
    device.cpu_threads(local_world_size)
    init_process_group(device, rank, world_size)
    plan = ParallelPlan(cfg.worldSize, cfg.dp, cfg.tp, cfg.moe_tp, cfg.moe_ep)
    groups = build_groups(plan, rank, device.backend)
    args = ModelArgs.from_dir(model_dir)
    t0 = time.perf_counter()
    model = DeepseekModel(args, groups, engine_options(cfg), DTYPES[cfg.dtype], device.torch)
    stats = load_weights(model.targets(), model_dir, plan, rank, device, mtp=cfg.mtp)
    device.synchronize()
    seconds = time.perf_counter() - t0
    page_size = min(cfg.cacheBlockSize, cfg.maxSeqLen)
    slots = wanted_slots(cfg.maxBatchSize, cfg.dp)
    pages = _kv_pages(model, cfg, page_size, device, groups)
    cache = model.new_cache(slots, cfg.maxSeqLen, page_size, pages)
    channel: Channel = DistChannel(groups.cpu.pg) if world_size > 1 else LocalChannel()
    log.info(
        "rank %d on %s: %s; KV cache %d pages x %d positions for %d slots",
        rank,
        device.torch,
        stats,
        pages,
        page_size,
        slots,
    )
    runner = ModelRunner(
        model,
        cache,
        groups,
        device,
        fixed_shape_decode(model, cache, cfg, cfg.maxBatchSize),
        cfg.num_speculative_tokens,
    )
    paging = Paging(page_size, pages, cfg.dp, cfg.prefixCaching)
    return Loaded(runner, channel, seconds, stats.bytes, cfg.maxBatchSize, paging)


def agree_kv_pages(offer: KVPages | KVBudgetError, group: Group) -> int:
    """The smallest offer over the group's ranks, which must all allocate alike.

    Every rank reaches the all-reduce (a refusing rank offers 0 pages), so a refusal is raised on
    every rank instead of leaving the others waiting in the collective.
    """
    mine = offer.pages if isinstance(offer, KVPages) else 0
    agreed = int(group.all_min(torch.tensor([mine], dtype=torch.int64)).item())
    if isinstance(offer, KVBudgetError):
        # A new exception: re-raising `offer` would tie it, through its traceback, to this frame
        # and so to the process group (a cycle freed late, after the group is destroyed).
        raise KVBudgetError(str(offer)) from None
    if agreed == 0:
        raise KVBudgetError(
            "KV cache: another rank's npuMemSize budget holds no maxSeqLen sequence; see its log"
        )
    return agreed


def _kv_pages(
    model: DeepseekModel, cfg: EngineConfig, page_size: int, device: Device, groups: ParallelGroups
) -> int:
    """KV pages per dp group within npuMemSize, the minimum over all ranks (they must agree)."""
    a = model.args
    page_bytes = kv_bytes(
        a.num_layers + len(model.mtp),
        page_size,
        a.kv_lora_rank,
        a.qk_rope_dim,
        model.dtype.itemsize,
    )
    per_sequence = pages_for(cfg.maxSeqLen, page_size)
    free: int | None = None
    if device.is_accelerator:
        device.module.empty_cache()  # the loader's freed staging blocks count as free
        free = int(device.module.mem_get_info(device.torch)[0])
    offer: KVPages | KVBudgetError
    try:
        offer = plan_kv_pages(
            page_bytes,
            per_sequence,
            wanted_slots(cfg.maxBatchSize, cfg.dp),
            cfg.npuMemSize,
            free,
        )
    except KVBudgetError as exc:
        offer = exc
    agreed = agree_kv_pages(offer, groups.cpu)
    assert isinstance(offer, KVPages)  # a refusal was raised on every rank
    if agreed < offer.wanted:
        log.warning(
            "KV cache: %s; %d pages agreed over the ranks: %d sequences of maxSeqLen (%d) fit "
            "at once per dp group, more when shorter (pages are taken as tokens come)",
            offer.reason,
            agreed,
            agreed // per_sequence,
            cfg.maxSeqLen,
        )
    else:
        log.info("KV cache: %s", offer.reason)
    return agreed
