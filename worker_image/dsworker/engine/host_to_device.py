"""Host -> device copies of weights, async on a side stream, in one of three ways (BENCHMARKS.md):

- staged, one thread (threads 1): two reused pinned buffers, alternating; the caller fills one
  while the other is in flight, and fresh host memory is never touched;
- staged, N threads: a ring of N pinned buffers and N worker threads; each takes a free buffer,
  fills it from the mapping (the memcpy and its page faults) and queues its copy, so N fills run
  at once while the copy engine drains the ring;
- direct: the mapped file pages are registered with the driver (read-only) and copied from
  where they lie, with no host memcpy; what it cannot take (strided slices, misaligned tensors,
  a file the driver refused) goes staged.
Without a stream (CPU) tensors are used where they lie, or copied into their targets (by the
ring's threads, with N threads).
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from dsworker.parallel.device import Device

BUFFER_BYTES = 64 << 20  # one buffer of the two-buffer path
RING_BUFFER_BYTES = 16 << 20  # one buffer of the ring: small enough that big tensors spread
ENV_THREADS = "DSWORKER_LOADER_THREADS"
ENV_DIRECT = "DSWORKER_LOADER_DIRECT"
DEFAULT_THREADS = 1
DEFAULT_DIRECT = False


@dataclass(frozen=True)
class CopyOptions:
    """How the host side feeds the copies: worker threads (1 = the caller alone) and whether
    the mapped files are registered with the driver and copied directly."""

    threads: int = DEFAULT_THREADS
    direct: bool = DEFAULT_DIRECT

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= 64:
            raise ValueError(f"{ENV_THREADS}: {self.threads} loader threads; use 1 to 64")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CopyOptions:
        """DSWORKER_LOADER_THREADS (int) and DSWORKER_LOADER_DIRECT (0/1); unset: the defaults."""
        env = os.environ if environ is None else environ
        raw_threads = env.get(ENV_THREADS, "").strip()
        raw_direct = env.get(ENV_DIRECT, "").strip().lower()
        try:
            threads = int(raw_threads) if raw_threads else DEFAULT_THREADS
        except ValueError:
            raise ValueError(
                f"{ENV_THREADS}={raw_threads!r}: not an integer; use 1 to 64"
            ) from None
        if raw_direct not in ("", "0", "1", "true", "false"):
            raise ValueError(f"{ENV_DIRECT}={raw_direct!r}: use 0 or 1")
        direct = raw_direct in ("1", "true") if raw_direct else DEFAULT_DIRECT
        return cls(threads, direct)

    @property
    def label(self) -> str:
        return ("direct+" if self.direct else "") + f"threads={self.threads}"


def blocks(src: torch.Tensor, dst: torch.Tensor, cap: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """(host block, device block) pairs of at most `cap` bytes that together copy src -> dst:
    flat byte ranges of a contiguous tensor, blocks of whole rows of a dim-1 slice."""
    if src.is_contiguous() or src.dim() < 2:
        flat_src = src.contiguous().reshape(-1).view(torch.uint8)
        flat_dst = dst.reshape(-1).view(torch.uint8)
        for a in range(0, flat_src.numel(), cap):
            yield flat_src[a : a + cap], flat_dst[a : a + cap]
        return
    rows2d = src.reshape(src.shape[0], -1)  # a dim-1 slice: strided rows
    row_bytes = rows2d.shape[1] * src.element_size()
    if row_bytes > cap:  # a row wider than a buffer (never for DeepSeek): gather it first
        yield from blocks(src.contiguous(), dst, cap)
        return
    step = max(1, cap // max(1, row_bytes))
    dst2d = dst.view(dst.shape[0], -1)
    for a in range(0, rows2d.shape[0], step):
        yield rows2d[a : a + step], dst2d[a : a + step]


class HostToDevice:
    """Host -> device through pinned buffers (two alternating, or a ring fed by threads), or
    straight from registered mappings; async on a side stream until `finish`."""

    def __init__(
        self, device: Device, buffer_bytes: int | None = None, options: CopyOptions | None = None
    ) -> None:
        self.device = device
        self.options = options or CopyOptions()
        self.stream = device.stream()
        threads = self.options.threads
        size = buffer_bytes or (RING_BUFFER_BYTES if threads > 1 else BUFFER_BYTES)
        self.cap = size
        self.bufs = [device.pinned(size) for _ in range(max(2, threads))] if self.stream else []
        self.events: list[Any] = [None] * len(self.bufs)
        self.turn = 0
        self.pool = ThreadPoolExecutor(threads, "dsworker-h2d") if threads > 1 else None
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(len(self.bufs)):
            self.free.put(i)
        self.pending: list[Future[None]] = []
        self.registered: list[torch.Tensor] = []  # mappings the driver page-locked
        self.direct_bytes = 0  # bytes copied straight from registered mappings
        self.staged_bytes = 0  # bytes copied through the pinned buffers

    @property
    def direct(self) -> bool:
        return self.options.direct and self.stream is not None

    def register(self, mapping: torch.Tensor) -> bool:
        """Page-lock a whole mapped file for direct copies; False leaves it to the staging path."""
        if not self.direct or not self.device.register_host(mapping):
            return False
        self.registered.append(mapping)
        return True

    def _is_registered(self, src: torch.Tensor) -> bool:
        p = src.data_ptr()
        end = p + src.numel() * src.element_size()
        for m in self.registered:
            lo = m.data_ptr()
            if lo <= p and end <= lo + m.numel():
                return True
        return False

    def to_device(self, src: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """src (CPU, possibly a strided mmap view) -> a contiguous device tensor (or into `out`).

        A returned tensor's copies are queued on `stream` when this returns (follow-up ops on
        that stream see the bytes); copies into `out` may still be in the workers' hands until
        `finish`."""
        if self.stream is None:  # CPU: nothing to stage; the ring's threads copy into `out`
            if out is None or self.pool is None:
                return src if out is None else out.copy_(src)
            self._submit(self._plain_copy, src, out, wait=False)
            return out
        with self.device.on_stream(self.stream):  # allocations belong to the copy stream
            dst = (
                out
                if out is not None
                else torch.empty(src.shape, dtype=src.dtype, device=self.device.torch)
            )
        if self.registered and src.is_contiguous() and self._is_registered(src):
            with self.device.on_stream(self.stream):
                dst.copy_(src, non_blocking=True)
            self.direct_bytes += src.numel() * src.element_size()
            return dst
        self.staged_bytes += src.numel() * src.element_size()
        if self.pool is None:
            for host, dev in blocks(src, dst, self.cap):
                self._stage(host, dev, self._next_buffer())
            return dst
        self._submit(self._ring_stage, src, dst, wait=out is None)
        return dst

    def _submit(
        self,
        work: Callable[[torch.Tensor, torch.Tensor], None],
        src: torch.Tensor,
        dst: torch.Tensor,
        wait: bool,
    ) -> None:
        """Hand src -> dst to the workers block by block; `wait`: until each block is queued."""
        assert self.pool is not None
        futures = [self.pool.submit(work, h, d) for h, d in blocks(src, dst, self.cap)]
        if wait:
            for f in futures:
                f.result()
            return
        self.pending += futures
        if len(self.pending) > 4096:
            self.pending = [f for f in self.pending if not f.done() or f.exception()]

    def _next_buffer(self) -> int:
        """The two-buffer path: the next buffer in turn."""
        i = self.turn
        self.turn ^= 1
        return i

    def _stage(self, host: torch.Tensor, dev: torch.Tensor, i: int) -> None:
        """Fill buffer i (once its last copy is done) with `host` and queue its copy to `dev`."""
        if self.events[i] is not None:
            self.events[i].synchronize()
        nbytes = host.numel() * host.element_size()
        buf = self.bufs[i][:nbytes].view(host.dtype).view(host.shape)
        buf.copy_(host)
        with self.device.on_stream(self.stream):
            dev.copy_(buf, non_blocking=True)
            self.events[i] = self.device.event()
            self.events[i].record(self.stream)

    @staticmethod
    def _plain_copy(host: torch.Tensor, dev: torch.Tensor) -> None:
        dev.copy_(host)

    def _ring_stage(self, host: torch.Tensor, dev: torch.Tensor) -> None:
        """A worker thread: take a free buffer of the ring, stage through it, hand it back."""
        i = self.free.get()
        try:
            self._stage(host, dev, i)
        finally:
            self.free.put(i)

    def finish(self) -> None:
        """Wait for every copy; a worker's failure is raised here."""
        pending, self.pending = self.pending, []
        for f in pending:
            f.result()
        if self.stream is not None:
            self.stream.synchronize()

    def close(self) -> None:
        """Stop the workers and release the registrations (after `finish`, or on failure)."""
        if self.pool is not None:
            for f in self.pending:
                f.cancel()
            self.pool.shutdown(wait=True)
            self.pool = None
        if self.stream is not None:
            self.stream.synchronize()
        for m in self.registered:
            self.device.unregister_host(m)
        self.registered.clear()
