"""Decode steps of fixed shapes, replayed as CUDA graphs: one per (batch, key-length) bucket.

At batch 1 a decode step is hundreds of small kernels; launched one by one from Python they cost
more than their math, and a captured graph launches them in one call. Inputs go through static
buffers; rows past the real batch decode token 0 into the cache's scratch slot and are dropped.
Without capture (cpu, npu, tests) the same padded step runs eagerly, so it is checked everywhere.
A step of one token per sequence on a world of one rank qualifies (MoE then needs no exchange).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from dsworker.buckets import batch_buckets, key_buckets, pick
from dsworker.model.batch import Batch, KVCache
from dsworker.model.model import DeepseekModel

log = logging.getLogger("dsworker.model")


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
    ) -> None:
        if model.groups.world.size != 1:
            raise ValueError("fixed-shape decode steps need a world of one rank")
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a cuda device, not {model.device}")
        self.model, self.cache, self.capture = model, cache, capture
        self.batch_sizes = batch_buckets(min(max_batch, cache.num_slots))
        self.key_lens = key_buckets(cache.max_len)
        # ids, positions, slots: one buffer, so a step's inputs arrive in one copy.
        self.inputs = torch.zeros(3, self.batch_sizes[-1], dtype=torch.long, device=model.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool: tuple[int, int] | None = None
        step: Callable[[int, int], torch.Tensor] = self._step
        if compile_backend:  # fullgraph: a host sync or data-dependent shape is an error
            # Sizes stay symbolic, so one compile serves every bucket (batch 1 gets its own).
            step = torch.compile(step, backend=compile_backend, fullgraph=True, dynamic=True)
        self._run = step

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def _step(self, b: int, k: int) -> torch.Tensor:
        ids, positions, slots = self.inputs[:, :b]
        batch = Batch.decode(ids, positions, slots, k)
        return self.model.forward(batch, self.cache).logits

    @torch.inference_mode(False)  # compiled code cannot take inference tensors
    @torch.no_grad()
    def run(
        self, slots: Sequence[int], positions: Sequence[int], ids: Sequence[int]
    ) -> torch.Tensor:
        """Logits [n, V] of one new token per sequence (ids[i] at positions[i] of slots[i])."""
        n = len(ids)
        b = pick(self.batch_sizes, n)
        k = pick(self.key_lens, max(positions) + 1)
        pad = b - n
        host = torch.tensor(
            [
                [*ids, *[0] * pad],
                [*positions, *[0] * pad],
                [*slots, *[self.cache.scratch_slot] * pad],
            ],
            dtype=torch.long,
        )
        self.inputs[:, :b].copy_(host, non_blocking=True)
        if not self.capture:
            return self._run(b, k)[:n]
        graph = self.graphs.get((b, k))
        if graph is None:
            graph = self._capture(b, k)
        graph[0].replay()
        return graph[1][:n].clone()  # the next replay overwrites the static output

    def _capture(self, b: int, k: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (the writes repeat the real step's), then capture."""
        t0 = time.perf_counter()
        side = torch.cuda.Stream(self.inputs.device)
        side.wait_stream(torch.cuda.current_stream(self.inputs.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(b, k)
        torch.cuda.current_stream(self.inputs.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._run(b, k)
        self.graphs[(b, k)] = (graph, out)
        seconds = time.perf_counter() - t0
        log.info("captured the decode step for batch %d, %d keys in %.2f s", b, k, seconds)
        return graph, out
