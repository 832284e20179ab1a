"""Decode steps of fixed shapes, replayed as CUDA graphs: one per (batch, key-length) bucket.

At batch 1 a decode step is hundreds of small kernels; launched one by one from Python they cost
more than their math, and a captured graph launches them in one call. Inputs go through static
buffers; rows past the real batch decode token 0 into the cache's scratch slot and are dropped.
Without capture (cpu, npu, tests) the same padded step runs eagerly, so it is checked everywhere.
A step of one token per sequence qualifies. With an MTP layer each sequence brings 1 + d tokens
(the last one and its d drafts), and the MTP pass that proposes the next drafts is a fixed-shape
step of its own over the same rows (`draft`), chaining the layer on its own drafts for d > 1.

On a world of several ranks every rank runs every step at the same bucket (the caller passes the
most sequences any dp group has, and the furthest key), so the MoE exchanges have the same shapes
everywhere and their collectives are captured with the step (model/moe_fixed.py); a rank with no
sequences runs the padded step. So does the draft step: its bucket and key length follow the
decode step's, and rows the EP level 2 buffers dropped in any of its MTP passes refuse it on every
rank. NPUs capture through torch_npu's NPUGraph where it is present.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from dsworker.model.batch import Batch, KVCache
from dsworker.model.graph_buckets import batch_buckets, key_buckets, pick
from dsworker.model.model import DeepseekModel
from dsworker.model.moe import ExpertBufferOverflow, MoE
from dsworker.model.moe_fixed import fixed_capacity
from dsworker.parallel.device_graphs import GraphApi, graph_api

log = logging.getLogger("dsworker.model")

VERIFY, DRAFT = "decode", "draft"


class _Run(NamedTuple):
    """The last decode step's layout, which its draft step reuses."""

    n: int  # sequences
    b: int  # their batch bucket
    slots: list[int]
    positions: list[int]  # per row, padded to b * width
    reach: int  # keys the step read: the furthest over the world, so every rank agrees


class DecodeGraphs:
    """Padded decode steps of one model and cache; graphs captured lazily when `capture`."""

    def __init__(
        self,
        model: DeepseekModel,
        cache: KVCache,
        max_batch: int,
        *,
        capture: bool,
        compile_backend: str | None = None,
        draft_tokens: int = 1,
    ) -> None:
        multi = model.groups.world.size > 1
        self.api: GraphApi | None = graph_api(model.device.type) if capture else None
        if capture and self.api is None:
            raise ValueError(
                f"graph capture needs a cuda device or an npu with torch_npu's NPUGraph, not "
                f"{model.device}"
            )
        self.model, self.cache, self.capture = model, cache, capture
        self.batch_sizes = batch_buckets(min(max_batch, cache.num_slots))
        self.key_lens = key_buckets(cache.max_len)
        self.draft_tokens = draft_tokens if len(model.mtp) else 0
        self.width = 1 + self.draft_tokens  # tokens per sequence: the last, then its drafts
        dev, rows = model.device, self.batch_sizes[-1]
        # ids, positions, slots [3, B, width]: one buffer per step kind, so inputs arrive in one copy.
        self.inputs = {
            kind: torch.zeros(3, rows, self.width, dtype=torch.long, device=dev)
            for kind in ((VERIFY, DRAFT) if self.width > 1 else (VERIFY,))
        }
        self.hidden: torch.Tensor | None = None  # the decode step's hidden states, MTP input
        self.last_row = torch.zeros(rows, dtype=torch.long, device=dev)  # each draft row's end
        self.capacity = torch.zeros(rows, dtype=torch.long, device=dev)  # each row's positions
        if self.width > 1:
            h = model.args.hidden_size
            self.hidden = torch.zeros(rows * self.width, h, dtype=model.dtype, device=dev)
        # Rows the fixed EP level 2 buffers dropped this step, summed over the world in the step.
        self.excess: torch.Tensor | None = None
        self._a2a = [m for m in model.modules() if isinstance(m, MoE) and m.opts.ep_level == 2]
        if multi and self._a2a:
            self.excess = torch.zeros(1, dtype=torch.long, device=dev)
            model.stats.a2a_excess = self.excess
        self.graphs: dict[tuple[str, int, int], tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self._last: _Run | None = None
        self._steps: dict[str, Callable[[int, int], torch.Tensor]] = {
            VERIFY: self._verify_step,
            DRAFT: self._draft_step,
        }
        if compile_backend:  # fullgraph: a host sync or data-dependent shape is an error
            # Sizes stay symbolic, so one compile serves every bucket (batch 1 gets its own).
            self._steps = {
                kind: torch.compile(fn, backend=compile_backend, fullgraph=True, dynamic=True)
                for kind, fn in self._steps.items()
            }

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def _batch(self, kind: str, b: int, k: int) -> Batch:
        ids, positions, slots = self.inputs[kind][:, :b]
        return Batch.decode(ids, positions, slots[:, 0], k, self._real(slots))

    def _real(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows outside the scratch slot: padding rows send no MoE rows (and take no room)."""
        return (slots != self.cache.scratch_slot).reshape(-1)

    def _sum_excess(self) -> None:
        """Every rank learns of any rank's dropped rows, at the end of each step."""
        if self.excess is not None:
            self.model.groups.world.all_reduce(self.excess)

    def _verify_step(self, b: int, k: int) -> torch.Tensor:
        out = self.model.forward(self._batch(VERIFY, b, k), self.cache, all_logits=True)
        if self.hidden is not None:
            self.hidden[: b * self.width].copy_(out.hidden)
        self._sum_excess()
        return out.logits

    def _draft_step(self, b: int, k: int) -> torch.Tensor:
        """Drafts [b, draft_tokens]: the MTP pass over the rows, read at each sequence's last
        valid row, then the layer chained on its own draft and hidden state, one position on;
        a chained position past the sequence's pages goes to the scratch slot (its draft is
        dropped)."""
        assert self.hidden is not None
        w, cache = self.width, self.cache
        batch = self._batch(DRAFT, b, k)
        out = self.model.forward_mtp(batch, self.hidden[: b * w], cache, all_logits=True)
        rows = torch.arange(b, device=batch.slots.device)
        last = self.last_row[:b]
        draft = out.logits.view(b, w, -1)[rows, last].argmax(-1)
        h = out.hidden.view(b, w, -1)[rows, last]
        pos = batch.q_pos[rows, last]
        drafts = [draft]
        for j in range(1, self.draft_tokens):
            inside = pos + j < self.capacity[:b]
            at = torch.where(inside, pos + j, 0)
            slots = torch.where(inside, batch.slots, cache.scratch_slot)
            chain = Batch.decode(draft[:, None], at[:, None], slots, k, self._real(slots))
            step = self.model.forward_mtp(chain, h, cache, all_logits=True)
            draft, h = step.logits.argmax(-1), step.hidden
            drafts.append(draft)
        self._sum_excess()
        return torch.stack(drafts, dim=1)

    def _load(self, kind: str, b: int, ids: list[int], slots: list[int]) -> None:
        """Pad to the bucket (token 0 into the scratch slot) and copy in with the positions."""
        assert self._last is not None
        pad = b * self.width - len(ids)
        host = torch.tensor(
            [
                [*ids, *[0] * pad],
                self._last.positions[: b * self.width],
                [*slots, *[self.cache.scratch_slot] * pad],
            ],
            dtype=torch.long,
        )
        self.inputs[kind][:, :b].copy_(host.view(3, b, self.width), non_blocking=True)

    @torch.inference_mode(False)  # compiled code cannot take inference tensors
    @torch.no_grad()
    def run(
        self,
        slots: Sequence[int],
        positions: Sequence[int],
        tokens: Sequence[Sequence[int]],
        *,
        rows: int = 0,
        reach: int = 0,
    ) -> torch.Tensor:
        """Logits [n * width, V]: each sequence's `width` tokens from positions[i] of slots[i].

        On a world of several ranks every rank passes the same `rows` (the most sequences any dp
        group has) and `reach` (the furthest key of the step), so all pick the same bucket.
        """
        n, w = len(tokens), self.width
        if any(len(t) != w for t in tokens):
            raise ValueError(f"a fixed-shape step takes {w} tokens per sequence")
        if not max(n, rows):
            raise ValueError("a fixed-shape step needs a sequence on some rank")
        b = pick(self.batch_sizes, max(n, rows))
        reach = max([reach, *(p + w for p in positions)])
        pos = [p + j for p in positions for j in range(w)] + [
            j for _ in range(b - n) for j in range(w)
        ]
        self._last = _Run(n, b, list(slots), pos, reach)
        self._load(
            VERIFY, b, [t for row in tokens for t in row], [s for s in slots for _ in range(w)]
        )
        logits = self._launch(VERIFY, b, pick(self.key_lens, reach))[: n * w]
        self._check(VERIFY, b * w)
        return logits.clone() if self.capture else logits  # the next replay overwrites it

    def _check(self, kind: str, *tokens: int) -> None:
        """Refuse the step that dropped rows: the sum is the same on every rank, so every rank
        refuses it. `tokens`: what each of the step's MoE passes dispatched per dp group."""
        excess = int(self.excess.item()) if self.excess is not None else 0
        if not excess:
            return
        moe = self._a2a[0]
        chunks = sorted({-(-t // moe.g.tp.size) for t in tokens}, reverse=True)
        sizes = ", ".join(
            f"{fixed_capacity(moe, c)} rows for {c} tokens per rank (factor "
            f"{moe.opts.buffer_factor(c)})"
            for c in chunks
        )
        raise ExpertBufferOverflow(
            f"EP level 2 (fixed-shape {kind} step): {excess} routed rows did not fit the AllToAll "
            f"buffers of {sizes} from alltoall_ep_buffer_scale_factors (top_k "
            f"{moe.args.top_k}, moe_ep {moe.g.moe_ep.size}); raise that factor"
        )

    @torch.inference_mode(False)
    @torch.no_grad()
    def draft(self, rows: Sequence[Sequence[int] | None]) -> list[tuple[int, ...]]:
        """The MTP pass over the last `run`'s rows: per sequence, the tokens that followed its
        positions (1..width of them; None when it needs no draft) -> its greedy drafts.

        A sequence short of `width` tokens (a draft was rejected) writes stale MTP cache entries
        past its end, which later passes overwrite; None rows write to the scratch slot.
        """
        if self.width == 1:
            raise ValueError("draft needs a model with an MTP layer")
        if self._last is None or len(rows) != self._last.n:
            raise ValueError("draft follows a run over the same sequences")
        n, b, slots, positions, reach = self._last
        ids: list[int] = []
        where: list[int] = []
        ends: list[int] = []
        caps: list[int] = []
        for row, slot in zip(rows, slots, strict=True):
            toks = list(row or ())
            if len(toks) > self.width:
                raise ValueError(f"a draft row holds 1 to {self.width} tokens, not {len(toks)}")
            ids += toks + [0] * (self.width - len(toks))
            where += [slot if toks else self.cache.scratch_slot] * self.width
            ends.append(max(0, len(toks) - 1))
            caps.append(self.cache.capacity[slot] if toks else 0)
        self._load(DRAFT, b, ids, where)
        pad = [0] * (b - n)
        self.last_row[:b].copy_(torch.tensor(ends + pad), non_blocking=True)
        self.capacity[:b].copy_(torch.tensor(caps + pad), non_blocking=True)
        # Keys up to the last chained position: the furthest row end (reach - 1) plus the chain.
        k = pick(self.key_lens, min(reach - 1 + self.draft_tokens, self.cache.max_len))
        best = self._launch(DRAFT, b, k)
        self._check(DRAFT, b * self.width, *([b] if self.draft_tokens > 1 else []))
        best = best[:n].tolist()
        out: list[tuple[int, ...]] = []
        for i, row in enumerate(rows):
            if not row:
                out.append(())
                continue
            end = positions[i * self.width] + len(row) - 1  # the last position the pass read
            out.append(tuple(best[i][: self.cache.chain_room(slots[i], end, self.draft_tokens)]))
        return out

    def _launch(self, kind: str, b: int, k: int) -> torch.Tensor:
        graph = self.graphs.get((kind, b, k))
        if self.capture and graph is None:
            graph = self._capture(kind, b, k)
        if self.excess is not None:  # counts this step only (not a capture's warm-up)
            self.excess.zero_()
        if graph is None:
            return self._steps[kind](b, k)
        graph[0].replay()
        return graph[1]

    def _capture(self, kind: str, b: int, k: int) -> tuple[Any, torch.Tensor]:
        """Warm up on a side stream (the writes repeat the real step's), then capture.

        Every rank of a wider world captures the same bucket at the same step (the bucket is
        chosen from the whole step), so the warm-up's collectives meet their peers'.
        """
        api = self.api
        assert api is not None
        t0 = time.perf_counter()
        dev = self.inputs[kind].device
        side = api.module.Stream(dev)
        side.wait_stream(api.module.current_stream(dev))
        with api.module.stream(side):
            for _ in range(2):
                self._steps[kind](b, k)
        api.module.current_stream(dev).wait_stream(side)
        if self._pool is None:
            self._pool = api.pool_handle()
        graph = api.new_graph()
        with api.capture(graph, pool=self._pool):
            out = self._steps[kind](b, k)
        self.graphs[(kind, b, k)] = (graph, out)
        seconds = time.perf_counter() - t0
        log.info("captured the %s %s step for batch %d, %d keys in %.2f s", api.kind, kind, b, k,
                 seconds)  # fmt: skip
        return graph, out
