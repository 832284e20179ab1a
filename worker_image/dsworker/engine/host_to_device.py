"""Host -> device copies of weights through two reused pinned buffers, alternating, with async
copies on a side stream: the CPU fills one buffer while the other is in flight, and fresh host
memory is never touched (see BENCHMARKS.md). Without a stream (CPU) tensors stay where they are.
"""

from __future__ import annotations

from typing import Any

import torch

from dsworker.parallel.device import Device

BUFFER_BYTES = 64 << 20


class HostToDevice:
    """Host -> device through two reused pinned buffers, alternating, async on a side stream."""

    def __init__(self, device: Device, buffer_bytes: int | None = None) -> None:
        self.device = device
        self.stream = device.stream()
        size = buffer_bytes or BUFFER_BYTES
        self.bufs = [device.pinned(size) for _ in range(2)] if self.stream else []
        self.events: list[Any] = [None, None]
        self.turn = 0

    def _slot(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """The next buffer, once the copy that last used it has finished."""
        i = self.turn
        self.turn ^= 1
        if self.events[i] is not None:
            self.events[i].synchronize()
        return i, self.bufs[i][:nbytes]

    def _push(self, i: int, buf: torch.Tensor, dst: torch.Tensor) -> None:
        with self.device.on_stream(self.stream):
            dst.copy_(buf, non_blocking=True)
            self.events[i] = self.device.event()
            self.events[i].record(self.stream)

    def to_device(self, src: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """src (CPU, possibly a strided mmap view) -> a contiguous device tensor (or into `out`)."""
        if self.stream is None:
            return src if out is None else out.copy_(src)
        with self.device.on_stream(self.stream):  # allocations belong to the copy stream
            dst = (
                out
                if out is not None
                else torch.empty(src.shape, dtype=src.dtype, device=self.device.torch)
            )
        cap = self.bufs[0].numel()
        if src.is_contiguous() or src.dim() < 2:
            flat_src = src.contiguous().reshape(-1).view(torch.uint8)
            flat_dst = dst.reshape(-1).view(torch.uint8)
            for a in range(0, flat_src.numel(), cap):
                n = min(cap, flat_src.numel() - a)
                i, buf = self._slot(n)
                buf.copy_(flat_src[a : a + n])
                self._push(i, buf, flat_dst[a : a + n])
            return dst
        rows2d = src.reshape(src.shape[0], -1)  # a dim-1 slice: strided rows
        row_bytes = rows2d.shape[1] * src.element_size()
        if row_bytes > cap:  # a row wider than a buffer (never for DeepSeek): gather it first
            return self.to_device(src.contiguous(), out)
        step = max(1, cap // max(1, row_bytes))
        dst2d = dst.view(dst.shape[0], -1)
        for a in range(0, rows2d.shape[0], step):
            blk = rows2d[a : a + step]
            i, buf = self._slot(blk.numel() * src.element_size())
            buf = buf.view(src.dtype).view(blk.shape)
            buf.copy_(blk)
            self._push(i, buf, dst2d[a : a + step])
        return dst

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
