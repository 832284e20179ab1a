"""One rank's side of a step: the scheduler's Step becomes the model's Batch.

With dp > 1 a sequence lives on dp group slot % dp (its KV cache is there), every rank runs its
group's part of the step (possibly empty: the MoE exchanges span the world) and rank 0 gathers the
sampled rows' logits from each group's first rank. Pure decode steps run through the decode graphs
where they apply.

With MTP on, each step is followed by a draft pass: every rank runs the MTP layer over its items'
positions (the hidden states the step just produced and the tokens rank 0 sampled after them) and
rank 0 collects each sequence's greedy drafts (num_speculative_tokens, chained) for the next step
to verify.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsworker.engine.steps import DraftInput, Step, StepError, StepItem
from dsworker.model import Batch, DeepseekModel, ExpertBufferOverflow, KVCache
from dsworker.model.decode_graphs import DecodeGraphs
from dsworker.parallel.device import Device
from dsworker.parallel.groups import ParallelGroups


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
        self._graphed = self._fixed_shape(step)
        logits = self._run_fixed(step, mine) if self._graphed else self._forward(indexed)
        if self._count_drops:
            self._sum_drops()
        if self.dp == 1:
            return logits
        return self._gather(step, logits)

    def _run_fixed(self, step: Step, mine: list[StepItem]) -> torch.Tensor:
        """The step through the graphs, at the bucket of the busiest dp group (every rank alike)."""
        g = self.graphs
        assert g is not None
        try:
            logits = g.run(
                [it.slot // self.dp for it in mine],
                [it.start for it in mine],
                [it.tokens for it in mine],
                rows=max(self._per_group(step)),
                reach=max(it.start + len(it.tokens) for it in step.items),
            )
        except ExpertBufferOverflow as exc:  # summed over the world: raised on every rank
            raise StepError(str(exc)) from None
        w = g.width
        picked = [i * w + j for i, it in enumerate(mine) if it.sample for j in range(w)]
        return logits[picked] if len(picked) != logits.shape[0] else logits

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

        Every rank runs it (the MTP block's MoE exchanges span the world): after a graphed step
        the graphs' draft step (padded where none of the inputs are its own), else an ordinary
        one (an empty batch there); with no inputs at all every rank skips it alike. The first
        pass reads the step's hidden states; each further draft runs the MTP layer on the
        previous draft and the layer's own hidden state, one position on.
        """
        hidden, offsets = self._hidden, self._offsets
        self._hidden, self._offsets = None, {}
        if not inputs:
            return {} if self.groups.rank == 0 else None
        if self._graphed:
            mine, tokens = self._graph_drafts(step, inputs)
        else:
            assert hidden is not None, "run_drafts follows a step of this runner"
            mine, tokens = self._eager_drafts(step, inputs, hidden, offsets)
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

    def _eager_drafts(
        self,
        step: Step,
        inputs: tuple[DraftInput, ...],
        hidden: torch.Tensor,
        offsets: dict[int, int],
    ) -> tuple[list[DraftInput], torch.Tensor]:
        """Ordinary MTP passes over this rank's inputs, on the step's hidden states (`offsets`:
        each of its items' first row there): the inputs and their drafts, -1 past room."""
        mine = [d for d in inputs if d.index in offsets]
        rows = [offsets[d.index] + j for d in mine for j in range(d.count)]
        items = [step.items[d.index] for d in mine]
        seqs = [
            (it.slot // self.dp, it.start, d.tokens(it)) for d, it in zip(mine, items, strict=True)
        ]
        picked = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        return mine, self._mtp(
            Batch.build(seqs, self.device), hidden[picked], [s[:2] for s in seqs]
        )

    def _graph_drafts(
        self, step: Step, inputs: tuple[DraftInput, ...]
    ) -> tuple[list[DraftInput], torch.Tensor]:
        """The graphs' draft step over this rank's items of the graphed `step` (padded where it
        has none): the inputs it drafted for and their drafts [n, draft_tokens], -1 past room."""
        g = self.graphs
        assert g is not None
        given = {d.index: d for d in inputs}
        indexed = self._mine(step)
        try:
            drafts = g.draft([given[i].tokens(it) if i in given else None for i, it in indexed])
        except ExpertBufferOverflow as exc:  # summed over the world: raised on every rank
            raise StepError(str(exc)) from None
        mine = [given[i] for i, _ in indexed if i in given]
        tokens = torch.full((len(mine), self.draft_tokens), -1, dtype=torch.int64)
        kept = [d for (i, _), d in zip(indexed, drafts, strict=True) if i in given]
        for row, d in enumerate(kept):
            tokens[row, : len(d)] = torch.tensor(d, dtype=torch.int64)
        return mine, tokens

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

    def _fixed_shape(self, step: Step) -> bool:
        """A pure decode step the graphs hold a bucket for: one token per sequence, or with MTP
        the last token and its drafts. Judged on the whole step, so every rank agrees."""
        g = self.graphs
        if g is None or not step.items:
            return False
        return max(self._per_group(step)) <= g.max_batch and all(
            len(it.tokens) == g.width and it.drafts == g.width - 1 and not it.prompt_rows
            for it in step.items
        )

    def _per_group(self, step: Step) -> list[int]:
        """Sequences of the step on each dp group."""
        counts = [0] * self.dp
        for it in step.items:
            counts[it.slot % self.dp] += 1
        return counts

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
