"""The bridge from scheduler steps to the engine's DeepseekModel on one rank.

It builds the rank (device, process groups, model, weights, KV cache) from the engine config and
turns each Step into the model's Batch. With dp > 1 a sequence lives on dp group slot % dp (its KV
cache is there), every rank runs its group's part of the step (possibly empty: the MoE exchanges
span the world) and rank 0 gathers the sampled rows' logits from each group's first rank.

With MTP on, each step is followed by a draft pass: every rank runs the MTP layer over its items'
positions (the hidden states the step just produced and the tokens rank 0 sampled after them) and
rank 0 collects each sequence's greedy drafts (num_speculative_tokens, chained) for the next step
to verify.
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
from dsworker.engine.loader import load_weights
from dsworker.engine.loop import StepError
from dsworker.engine.scheduler import DraftInput, Paging, Scheduler, Step, StepItem
from dsworker.model import (
    Batch,
    DeepseekModel,
    EngineOptions,
    ExpertBufferOverflow,
    KVCache,
    ModelArgs,
    MoEOptions,
)
from dsworker.model.decode_graphs import DecodeGraphs
from dsworker.parallel.device import Device
from dsworker.parallel.groups import Group, ParallelGroups, build_groups, init_process_group

log = logging.getLogger("dsworker.engine.runner")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelRunner:
    """Runs steps on one rank's model shard; rank 0 gets the logits of every sampled item."""

    def __init__(
        self,
        model: DeepseekModel,
        cache: KVCache,
        groups: ParallelGroups,
        device: Device,
        graphs: DecodeGraphs | None = None,
        draft_tokens: int = 1,
    ) -> None:
        self.model = model
        self.graphs = graphs
        self.cache = cache
        self.groups = groups
        self.dev = device
        self.device = device.torch
        self.dp = groups.plan.dp
        self.dp_rank = groups.coords.dp_rank
        self.vocab = model.args.vocab_size
        # Drafts per sequence and step: the MTP layer's own, then it again on each draft.
        self.draft_tokens = draft_tokens if len(model.mtp) else 0
        self._count_drops = model.opts.moe.routing_cutoff is not None
        self._dropped_total = 0
        # The last step's hidden states and where each of its items starts in them (MTP input).
        self._hidden: torch.Tensor | None = None
        self._offsets: dict[int, int] = {}
        self._graphed = False  # the last step ran through the graphs (so does its draft pass)

    @property
    def drafting(self) -> bool:
        """The MTP layer is loaded: every step is followed by run_drafts."""
        return self.draft_tokens > 0

    def _mine(self, step: Step) -> list[tuple[int, StepItem]]:
        """This dp group's items with their index in the step."""
        return [(i, it) for i, it in enumerate(step.items) if it.slot % self.dp == self.dp_rank]

    @torch.inference_mode()
    def run(self, step: Step) -> torch.Tensor | None:
        """Logits of every item's rows (`StepItem.rows`), in step order (rank 0; others None)."""
        indexed = self._mine(step)
        mine = [it for _, it in indexed]
        for it in mine:  # a new sequence's first item brings its KV pages
            if it.pages:
                self.cache.assign(it.slot // self.dp, it.pages)
        self._graphed = self._fixed_shape(mine)
        if self._graphed:
            assert self.graphs is not None
            logits = self.graphs.run(
                [it.slot for it in mine], [it.start for it in mine], [it.tokens for it in mine]
            )
            w = self.graphs.width
            picked = [i * w + j for i, it in enumerate(mine) if it.sample for j in range(w)]
            logits = logits[picked] if len(picked) != logits.shape[0] else logits
        else:
            logits = self._forward(indexed)
        if self._count_drops:
            self._sum_drops()
        if self.dp == 1:
            return logits
        return self._gather(step, logits)

    def _forward(self, indexed: list[tuple[int, StepItem]]) -> torch.Tensor:
        seqs: list[tuple[int, int, tuple[int, ...]]] = []
        offsets: dict[int, int] = {}  # step item index -> its first row in this rank's batch
        rows: list[int] = []
        at = 0
        for i, it in indexed:
            seqs.append((it.slot // self.dp, it.start, it.tokens))
            offsets[i] = at
            at += len(it.tokens)
            rows += range(at - it.rows, at)
        batch = Batch.build(seqs, self.device)
        picked = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        try:
            out = self.model.forward(batch, self.cache, rows=picked)
        except ExpertBufferOverflow as exc:  # raised on every rank alike (a gathered table)
            raise StepError(str(exc)) from None
        if self.drafting:
            self._hidden, self._offsets = out.hidden, offsets
        return out.logits

    @torch.inference_mode()
    def run_drafts(
        self, step: Step, inputs: tuple[DraftInput, ...]
    ) -> dict[int, tuple[int, ...]] | None:
        """The MTP pass after `step`: seq_id -> greedy drafts on rank 0 (others None).

        Every rank runs it (the MTP block's MoE exchanges span the world), an empty batch where
        none of the inputs are its own; with no inputs at all every rank skips it alike. The
        first pass reads the step's hidden states; each further draft runs the MTP layer on the
        previous draft and the layer's own hidden state, one position on.
        """
        hidden, offsets = self._hidden, self._offsets
        self._hidden, self._offsets = None, {}
        if not inputs:
            return {} if self.groups.rank == 0 else None
        if self._graphed:  # world 1: every item is this rank's, in step order
            assert self.graphs is not None
            given = {d.index: d.tokens(step.items[d.index]) for d in inputs}
            drafts = self.graphs.draft([given.get(i) for i in range(len(step.items))])
            return {it.seq_id: d for it, d in zip(step.items, drafts, strict=True) if d}
        assert hidden is not None, "run_drafts follows a step of this runner"
        mine = [d for d in inputs if d.index in offsets]
        rows = [offsets[d.index] + j for d in mine for j in range(d.count)]
        items = [step.items[d.index] for d in mine]
        seqs = [
            (it.slot // self.dp, it.start, d.tokens(it)) for d, it in zip(mine, items, strict=True)
        ]
        picked = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        tokens = self._mtp(Batch.build(seqs, self.device), hidden[picked], [s[:2] for s in seqs])
        if self.dp > 1:  # every group's drafts on every rank: -1 where a group had none
            where = {d.index: i for i, d in enumerate(inputs)}
            flat = torch.full((len(inputs), self.draft_tokens), -1, dtype=torch.int64)
            flat[[where[d.index] for d in mine]] = tokens
            tokens, mine = self.groups.cpu.all_max(flat), list(inputs)
        if self.groups.rank != 0:
            return None
        return {
            step.items[d.index].seq_id: tuple(t for t in row if t >= 0)
            for d, row in zip(mine, tokens.tolist(), strict=True)
        }

    def _mtp(
        self, batch: Batch, hidden: torch.Tensor, where: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Drafts [B, draft_tokens] (-1 past the cache's end) of the sequences in `batch`, whose
        (slot, start) are `where`: the first from the MTP pass over the batch, the rest chained."""
        out = torch.full((len(where), self.draft_tokens), -1, dtype=torch.int64)
        try:
            step = self.model.forward_mtp(batch, hidden, self.cache)
            draft = step.logits.argmax(-1)
            h = step.hidden[batch.last]
            out[:, 0] = draft.cpu()
            last = [int(p) for p in batch.positions[batch.last].tolist()] if where else []
            room = [
                self.cache.chain_room(w[0], p, self.draft_tokens)
                for w, p in zip(where, last, strict=True)
            ]
            for j in range(1, self.draft_tokens):
                # Draft j sits at position last + j + 1; the MTP reads it at last + j.
                live = [b for b, r in enumerate(room) if r > j]
                chain = Batch.build(
                    [(where[b][0], last[b] + j, (int(out[b, j - 1]),)) for b in live], self.device
                )
                keep = torch.tensor(live, dtype=torch.long).to(self.device, non_blocking=True)
                step = self.model.forward_mtp(chain, h[keep], self.cache)
                out[live, j] = step.logits.argmax(-1).cpu()
                h = h.index_copy(0, keep, step.hidden)
        except ExpertBufferOverflow as exc:
            raise StepError(str(exc)) from None
        return out

    def _fixed_shape(self, mine: list[StepItem]) -> bool:
        """A pure decode step the graphs hold a bucket for (world size 1, so every rank agrees):
        one token per sequence, or with MTP the last token and its draft."""
        g = self.graphs
        return (
            g is not None
            and 0 < len(mine) <= g.max_batch
            and all(
                len(it.tokens) == g.width and it.drafts == g.width - 1 and not it.prompt_rows
                for it in mine
            )
        )

    def _gather(self, step: Step, logits: torch.Tensor) -> torch.Tensor | None:
        """Collect each dp group's logit rows on rank 0, in step order."""
        scored = step.with_rows
        per_group = [[it for it in scored if it.slot % self.dp == d] for d in range(self.dp)]
        width = max(1, max(sum(it.rows for it in g) for g in per_group))
        padded = logits.new_zeros(width, logits.shape[1])
        padded[: logits.shape[0]] = logits
        world = self.groups.world
        rank = self.groups.rank
        bucket = [torch.empty_like(padded) for _ in range(world.size)] if rank == 0 else None
        dist.gather(padded, bucket, dst=0, group=world.pg)
        if bucket is None:
            return None
        tp = self.groups.plan.tp
        where: dict[int, tuple[int, int]] = {}
        for d, group in enumerate(per_group):
            at = 0
            for it in group:
                where[it.seq_id] = (d * tp, at)
                at += it.rows
        rows = [
            bucket[where[it.seq_id][0]][where[it.seq_id][1] : where[it.seq_id][1] + it.rows]
            for it in scored
        ]
        return torch.cat(rows) if rows else padded[:0]

    def _sum_drops(self) -> None:
        n = torch.tensor([self.model.stats.dropped_rows], dtype=torch.int64)
        self.groups.cpu.all_reduce(n)
        self._dropped_total = int(n.item())

    def dropped_rows(self) -> int:
        """Routed rows dropped by the routing cutoff so far, summed over the world."""
        return self._dropped_total


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


def fixed_shape_decode(
    model: DeepseekModel, cache: KVCache, cfg: EngineConfig, max_batch: int
) -> DecodeGraphs | None:
    """Graphed and/or compiled decode steps where they apply (world 1, no routing cutoff)."""
    capture = cfg.cudaGraphs and model.device.type == "cuda"
    if cfg.worldSize != 1 or cfg.enable_init_routing_cutoff or not (capture or cfg.torchCompile):
        return None
    backend = "inductor" if cfg.torchCompile else None
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
