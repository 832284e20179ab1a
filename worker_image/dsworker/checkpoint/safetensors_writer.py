"""Writing one safetensors file whose header is known up front and whose data streams in.

Bytes arrive in order (`write`), from another file in the kernel (`copy_from`), or early at their
known offset (`write_at`, stepped over later with `skip`). The file only gets its final name once
whole (`commit`), so a crash never leaves a final name that is not.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from dsworker.checkpoint import io_buffers
from dsworker.checkpoint.fsutil import disk_error, fsync_dir, tmp_name
from dsworker.checkpoint.io_buffers import scratch
from dsworker.checkpoint.safetensors_format import SafetensorsError, TensorSpec, build_header

if TYPE_CHECKING:
    import numpy as np


class SafetensorsWriter:
    """Streams one safetensors file: header first (sizes known up front), then data in spec order.

    Written under `.NAME.tmp`, fsynced and renamed on `commit()`; `abort()` removes the temporary
    file, so a crash never leaves a file with the final name that is not whole. With checksum=True
    the sha256 of the whole file is computed from the bytes as they are written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: list[TensorSpec],
        metadata: Mapping[str, str] | None = None,
        checksum: bool = False,
    ) -> None:
        self.path = Path(path)
        self.tmp = tmp_name(self.path)
        self.specs = specs
        self.header = build_header(specs, {"format": "pt"} if metadata is None else metadata)
        self.total = len(self.header) + sum(s.nbytes for s in specs)
        self.hash = hashlib.sha256() if checksum else None
        self.written = 0
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise disk_error(e, self.path) from e
        self.write(self.header)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        if self.hash is not None:
            self.hash.update(mv)
        try:
            while len(mv):
                n = os.write(self.fd, mv)
                mv = mv[n:]
                self.written += n
        except OSError as e:
            raise disk_error(e, self.path) from e

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """pwrite `data` at absolute file offset, leaving the sequential position alone.

        For bytes of a later tensor that arrive early (one pass over a source tensor feeding
        several files); the sequential writer later steps over them with `skip`. Not with a hash.
        """
        assert self.hash is None, "out-of-order writes cannot be hashed"
        mv = memoryview(data).cast("B")
        try:
            while len(mv):
                n = os.pwrite(self.fd, mv, offset)
                mv = mv[n:]
                offset += n
        except OSError as e:
            raise disk_error(e, self.path) from e

    def skip(self, n: int) -> None:
        """Step over `n` bytes already written with `write_at`."""
        assert self.hash is None, "out-of-order writes cannot be hashed"
        os.lseek(self.fd, n, os.SEEK_CUR)
        self.written += n

    def _kernel_copy(
        self, copy: Callable[[int, int], int], offset: int, length: int
    ) -> tuple[int, int]:
        """Loop one in-kernel copy call; returns the (offset, length) left if the kernel refuses it."""
        try:
            while length > 0:
                n = copy(offset, min(length, io_buffers.COPY_CHUNK))
                if n == 0:
                    raise SafetensorsError(
                        f"source file ended early while copying into {self.path}"
                    )
                offset += n
                length -= n
                self.written += n
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
                raise disk_error(e, self.path) from e
            # EXDEV/EINVAL/ENOSYS/EOPNOTSUPP: this call does not work between these files.
        return offset, length

    def copy_from(self, src_fd: int, offset: int, length: int) -> None:
        """Append `length` bytes of another file, in the kernel when no hash is needed.

        copy_file_range first (refused across file systems, e.g. disk -> tmpfs), then sendfile
        (one copy through the page cache), then pread/write.
        """
        if self.hash is None:
            for copy in (
                lambda o, n: os.copy_file_range(src_fd, self.fd, n, o),
                lambda o, n: os.sendfile(self.fd, src_fd, o, n),
            ):
                offset, length = self._kernel_copy(copy, offset, length)
                if length == 0:
                    return
        step = min(length, io_buffers.FALLBACK_CHUNK)
        buf = scratch(step)[:step]
        while length > 0:
            n = os.preadv(src_fd, [buf[: min(length, len(buf))]], offset)
            if n == 0:
                raise SafetensorsError(f"source file ended early while copying into {self.path}")
            self.write(buf[:n])
            offset += n
            length -= n

    def commit(self, sync_dir: bool = True) -> tuple[int, str | None]:
        """Check the size, fsync, rename to the final name; returns (bytes, sha256 or None).

        sync_dir=False leaves the directory fsync (which makes the rename durable) to the caller,
        who can then do it once per directory instead of once per file.
        """
        if self.written != self.total:
            self.abort()
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes, expected {self.total}")
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.path)
            if sync_dir:
                fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            raise disk_error(e, self.path) from e
        return self.total, (self.hash.hexdigest() if self.hash is not None else None)

    def abort(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def save_arrays(
    path: str | os.PathLike[str],
    tensors: Mapping[str, tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write {name: (safetensors dtype, array holding that dtype's bytes)} in one go (small files, tests)."""
    specs = [TensorSpec(n, dt, tuple(a.shape)) for n, (dt, a) in tensors.items()]
    w = SafetensorsWriter(path, specs, metadata)
    try:
        for s, (_, a) in zip(specs, tensors.values(), strict=True):
            b = a.tobytes()
            if len(b) != s.nbytes:
                raise ValueError(f"{s.name}: {len(b)} bytes for {s.dtype}{list(s.shape)}")
            w.write(b)
    except BaseException:
        w.abort()
        raise
    return w.commit()[0]
