"""Reading safetensors files lazily: the header at open, then byte ranges on demand.

Why our own: the sharding Job must run in a slim image and handle files of several GB with a memory
footprint that does not grow with them, so it reads byte ranges with os.pread / preadv into reused
buffers and short-lived mmaps, never a whole file.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dsworker.checkpoint import io_buffers
from dsworker.checkpoint.fsutil import open_regular
from dsworker.checkpoint.io_buffers import cached_iov, scratch
from dsworker.checkpoint.safetensors_format import (
    MAX_HEADER_BYTES,
    NUMPY_DTYPES,
    SafetensorsError,
    TensorInfo,
    corrupt,
    parse_header,
)
from dsworker.contract.errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np


class SafetensorsReader:
    """Lazy reader: parses and validates the header at open, reads byte ranges on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fd = -1
        try:  # a FIFO or a device is refused, never waited on
            self.fd = open_regular(self.path, "safetensors file")
        except CheckpointError as e:
            raise SafetensorsError(f"{e}; download it again or fix the index") from None
        try:
            self.size = os.fstat(self.fd).st_size
            self._parse()
        except BaseException:
            os.close(self.fd)
            self.fd = -1  # never close this number again: it may be reused by another file
            raise

    def _parse(self) -> None:
        if self.size < 8:
            raise corrupt(
                self.path, f"truncated ({self.size} bytes, less than the 8-byte header length)"
            )
        hlen = int.from_bytes(self._pread(0, 8), "little")
        if hlen > MAX_HEADER_BYTES:
            raise corrupt(self.path, f"corrupt header (claims a {hlen}-byte header)")
        if 8 + hlen > self.size:
            raise corrupt(
                self.path, f"truncated (header of {hlen} bytes but the file has {self.size} bytes)"
            )
        header = parse_header(self.path, self._pread(8, hlen), self.size)
        self.metadata: dict[str, str] = header.metadata
        self.tensors: dict[str, TensorInfo] = header.tensors

    def _pread(self, offset: int, length: int) -> bytes:
        """pread that loops over short reads and treats EOF as truncation."""
        chunks = []
        while length > 0:
            b = os.pread(self.fd, min(length, io_buffers.COPY_CHUNK), offset)
            if not b:
                raise corrupt(self.path, f"truncated (unexpected end of file at byte {offset})")
            chunks.append(b)
            offset += len(b)
            length -= len(b)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SafetensorsError(
                f"{self.path}: tensor {name} is not in this file; the index and the files disagree - "
                "re-download the checkpoint or fix model.safetensors.index.json"
            ) from None

    def read(self, name: str | TensorInfo, offset: int = 0, length: int | None = None) -> bytes:
        """Raw bytes of a tensor (or a byte range of it)."""
        t = name if isinstance(name, TensorInfo) else self.info(name)
        if length is None:
            length = t.nbytes - offset
        return self._pread(t.begin + offset, length)

    def array(self, name: str | TensorInfo) -> np.ndarray:
        """A whole tensor as numpy (BF16 as uint16 bits, FP8 as uint8). For small tensors only."""
        import numpy as np

        t = name if isinstance(name, TensorInfo) else self.info(name)
        return np.frombuffer(self.read(t), dtype=NUMPY_DTYPES[t.dtype]).reshape(t.shape)

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` from absolute file offset (preadv into a reused buffer: no fresh pages)."""
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                raise corrupt(
                    self.path, f"truncated (unexpected end of file at byte {offset + done})"
                )
            done += n

    def read_bands(
        self,
        t: TensorInfo,
        r0: int,
        r1: int,
        bands: list[tuple[int, int]],
        out: memoryview,
        bases: list[int],
        strides: list[int] | None = None,
    ) -> None:
        """Rows [r0,r1) of several byte-column bands of t (viewed as 2D), each to its own place.

        `bands` are sorted, disjoint [c0, c1) ranges; row i of band k lands at
        out[bases[k] + i*strides[k] ...] (strides default to the band widths: each band packed).
        One scatter read (preadv) per batch of rows reads every band of those rows at once (the
        bytes between bands go to a small junk buffer that stays in cache), so a tensor split into
        several column bands is read once, not once per band. No numpy: a dim-1 split costs about
        what a plain copy does.
        """
        row_bytes = t.nbytes // t.shape[0] if t.shape and t.shape[0] else t.nbytes
        steps = strides or [c1 - c0 for c0, c1 in bands]
        segs: list[tuple[int, int, int, int]] = []  # (band or -1 for junk, width, base, stride)
        pos = 0
        for k, (c0, c1) in enumerate(bands):
            if c0 > pos:
                segs.append((-1, c0 - pos, 0, 0))
            segs.append((k, c1 - c0, bases[k], steps[k]))
            pos = c1
        if pos < row_bytes:
            segs.append((-1, row_bytes - pos, 0, 0))
        junk = scratch(max([w for k, w, _, _ in segs if k < 0] + [1]), "junk")
        batch = max(1, io_buffers.IOV_MAX // len(segs))
        geom = (id(out.obj), id(junk.obj), row_bytes, tuple(segs))

        def iov_of(i0: int, i1: int) -> list[memoryview]:
            return [
                junk[:w] if k < 0 else out[base + i * step : base + i * step + w]
                for i in range(i0, i1)
                for k, w, base, step in segs
            ]

        for i0 in range(0, r1 - r0, batch):
            i1 = min(r1 - r0, i0 + batch)
            iov = cached_iov((*geom, i0, i1), lambda i0=i0, i1=i1: iov_of(i0, i1))
            got = os.preadv(self.fd, iov, t.begin + (r0 + i0) * row_bytes)
            if got != (i1 - i0) * row_bytes:
                raise corrupt(self.path, f"truncated (short read in tensor {t.name})")

    def rows(
        self, t: TensorInfo, r0: int, r1: int, c0: int, c1: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Bytes of tensor t viewed as 2D [shape[0], rest], rows [r0,r1), byte columns [c0,c1).

        Full rows come from one read; a column band (a dim-1 split) through a short-lived mmap of
        just those rows, so only the pages that hold the band are touched and memory stays bounded
        by the chunk, not the tensor. With `out` (uint8 [r1-r0, c1-c0]) the bytes land there, so
        callers can reuse one buffer instead of faulting in fresh memory for every chunk.
        """
        import numpy as np

        row_bytes = t.nbytes // t.shape[0] if t.shape and t.shape[0] else t.nbytes
        n = r1 - r0
        if out is None:
            out = np.empty((max(n, 0), c1 - c0), np.uint8)
        if n <= 0:
            return out
        if c0 == 0 and c1 == row_bytes and out.flags.c_contiguous:
            self.readinto(memoryview(out).cast("B"), t.begin + r0 * row_bytes)
            return out
        if (c1 - c0) * 4 >= row_bytes:
            # A wide band (moeTp/tp <= 4): reading whole rows into a reused buffer and slicing
            # beats faulting in an mmap; narrower bands touch fewer pages through the mmap.
            full = scratch(n * row_bytes, "band")[: n * row_bytes]
            self.readinto(full, t.begin + r0 * row_bytes)
            np.copyto(out, np.frombuffer(full, np.uint8).reshape(n, row_bytes)[:, c0:c1])
            return out
        start = t.begin + r0 * row_bytes + c0
        stop = t.begin + (r1 - 1) * row_bytes + c1
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(self.fd, stop - base, access=mmap.ACCESS_READ, offset=base)
        try:
            view = np.frombuffer(mm, np.uint8)
            skip = start - base
            band = np.lib.stride_tricks.as_strided(
                view[skip:], shape=(n, c1 - c0), strides=(row_bytes, 1), writeable=False
            )
            np.copyto(out, band)
            del view, band
        finally:
            mm.close()
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
