"""A minimal safetensors reader and writer over raw bytes (no torch, no whole-file reads).

Why our own: the sharding Job must run in a slim image and handle files of several GB with a memory
footprint that does not grow with them. The format is simple (8-byte little-endian header length,
a JSON header mapping names to dtype/shape/data_offsets, then the raw data), so we read the header,
then byte ranges with os.pread / copy_file_range / sendfile / short-lived mmaps, and write files
whose header is known up front and whose data streams in.

Reading validates everything a corrupt or truncated download could break and raises
`SafetensorsError` naming the file, the tensor and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsworker.checkpoint.fsutil import disk_error, fsync_dir, tmp_name
from dsworker.contract.errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# numpy dtype used to hold each safetensors dtype's bytes (BF16 and FP8 as raw bits).
NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "u1",
    "I8": "i1",
    "F8_E4M3": "u1",
    "F8_E5M2": "u1",
    "I16": "<i2",
    "U16": "<u2",
    "F16": "<f2",
    "BF16": "<u2",
    "I32": "<i4",
    "U32": "<u4",
    "F32": "<f4",
    "I64": "<i8",
    "U64": "<u8",
    "F64": "<f8",
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_COPY_CHUNK = 1 << 30


_FALLBACK_CHUNK = 256 << 10
_scratch: dict[tuple[int, str], bytearray] = {}


def scratch(n: int, slot: str = "copy") -> memoryview:
    """A per-process, per-slot reusable buffer of at least n bytes.

    Fresh memory is slow to touch on these VMs (page faults at ~1.4 GB/s); copying through one
    buffer that stays mapped avoids paying that for every chunk. Users of one slot must not nest.
    """
    key = (os.getpid(), slot)
    buf = _scratch.get(key)
    if buf is None or len(buf) < n:
        if len(_scratch) > 8:
            _scratch.clear()  # buffers of a parent process after fork
        buf = _scratch[key] = bytearray(max(n, _FALLBACK_CHUNK))
    return memoryview(buf)


try:
    _IOV_MAX = max(3, min(1024, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):
    _IOV_MAX = 1024
# Scatter lists by (buffers, geometry): chunks reuse the same buffers, so lists are reused too.
_IOV_CACHE: dict[tuple[int, ...], list[memoryview]] = {}


class SafetensorsError(CheckpointError):
    """A safetensors file that is missing, truncated or corrupt."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in its file (absolute offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def nbytes_of(dtype: str, shape: Iterable[int]) -> int:
    n = DTYPE_SIZES[dtype]
    for s in shape:
        n *= s
    return n


class SafetensorsReader:
    """Lazy reader: parses and validates the header at open, reads byte ranges on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fd = -1
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise SafetensorsError(
                f"{self.path}: safetensors file not found; download it again or fix the index"
            ) from None
        except IsADirectoryError:
            raise SafetensorsError(
                f"{self.path}: is a directory, expected a safetensors file"
            ) from None
        except PermissionError:
            raise SafetensorsError(f"{self.path}: permission denied; make it readable") from None
        try:
            self.size = os.fstat(self.fd).st_size
            self._parse()
        except BaseException:
            os.close(self.fd)
            self.fd = -1  # never close this number again: it may be reused by another file
            raise

    def _fail(self, why: str) -> SafetensorsError:
        return SafetensorsError(f"{self.path}: {why}; re-download or re-create this file")

    def _parse(self) -> None:
        if self.size < 8:
            raise self._fail(f"truncated ({self.size} bytes, less than the 8-byte header length)")
        hlen = int.from_bytes(self._pread(0, 8), "little")
        if hlen > MAX_HEADER_BYTES:
            raise self._fail(f"corrupt header (claims a {hlen}-byte header)")
        if 8 + hlen > self.size:
            raise self._fail(
                f"truncated (header of {hlen} bytes but the file has {self.size} bytes)"
            )
        raw = self._pread(8, hlen)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"corrupt header (not JSON: {e})") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt header (not a JSON object)")
        self.header_len = hlen
        self.data_start = 8 + hlen
        meta = header.pop("__metadata__", None)
        self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}
        infos: list[TensorInfo] = []
        data_len = self.size - self.data_start
        for name, ent in header.items():
            if not isinstance(ent, dict):
                raise self._fail(f"corrupt header entry for tensor {name!r}")
            dtype, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
            if dtype not in DTYPE_SIZES:
                raise self._fail(f"tensor {name}: unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise self._fail(f"tensor {name}: bad shape {shape!r}")
            if (
                not isinstance(offs, list)
                or len(offs) != 2
                or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]
            ):
                raise self._fail(f"tensor {name}: bad data_offsets {offs!r}")
            need = nbytes_of(dtype, shape)
            if offs[1] - offs[0] != need:
                raise self._fail(
                    f"tensor {name}: data_offsets span {offs[1] - offs[0]} bytes but "
                    f"{dtype}{shape} needs {need}"
                )
            if offs[1] > data_len:
                raise self._fail(
                    f"truncated: tensor {name} ends at data byte {offs[1]} but only {data_len} "
                    "data bytes are present (incomplete download?)"
                )
            infos.append(
                TensorInfo(
                    name, dtype, tuple(shape), self.data_start + offs[0], self.data_start + offs[1]
                )
            )
        infos.sort(key=lambda t: (t.begin, t.end))
        for a, b in zip(infos, infos[1:], strict=False):
            if b.begin < a.end:
                raise self._fail(f"corrupt header: tensors {a.name} and {b.name} overlap")
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in infos}

    def _pread(self, offset: int, length: int) -> bytes:
        """pread that loops over short reads and treats EOF as truncation."""
        chunks = []
        while length > 0:
            b = os.pread(self.fd, min(length, _COPY_CHUNK), offset)
            if not b:
                raise self._fail(f"truncated (unexpected end of file at byte {offset})")
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
                raise self._fail(f"truncated (unexpected end of file at byte {offset + done})")
            done += n

    def read_band(
        self,
        t: TensorInfo,
        r0: int,
        r1: int,
        c0: int,
        c1: int,
        out: memoryview,
        stride: int,
        col: int,
    ) -> None:
        """Rows [r0,r1) of byte columns [c0,c1) of t (viewed as 2D) into out[i*stride + col ...].

        One scatter read (preadv) per batch of rows: the band lands directly in `out`, the other
        bytes of each row in a one-row junk buffer that stays in cache. No numpy, one pass over
        the band's bytes - a dim-1 split costs about what a plain copy does.
        """
        row_bytes = t.nbytes // t.shape[0] if t.shape and t.shape[0] else t.nbytes
        n, w = r1 - r0, c1 - c0
        pre, post = c0, row_bytes - c1
        junk = scratch(max(pre, post, 1), "junk")
        per_row = 1 + (pre > 0) + (post > 0)
        batch = max(1, _IOV_MAX // per_row)
        for i0 in range(0, n, batch):
            i1 = min(n, i0 + batch)
            key = (id(out.obj), id(junk.obj), stride, col, w, pre, post, i0, i1)
            iov = _IOV_CACHE.get(key)
            if iov is None:
                iov = []
                for i in range(i0, i1):
                    if pre:
                        iov.append(junk[:pre])
                    iov.append(out[i * stride + col : i * stride + col + w])
                    if post:
                        iov.append(junk[:post])
                if len(_IOV_CACHE) > 64:
                    _IOV_CACHE.clear()
                _IOV_CACHE[key] = iov
            want = (i1 - i0) * row_bytes
            got = os.preadv(self.fd, iov, t.begin + (r0 + i0) * row_bytes)
            if got != want:
                raise self._fail(f"truncated (short read in tensor {t.name})")

    def read_bands(
        self,
        t: TensorInfo,
        r0: int,
        r1: int,
        bands: list[tuple[int, int]],
        out: memoryview,
        bases: list[int],
    ) -> None:
        """Rows [r0,r1) of several byte-column bands of t (viewed as 2D), each to its own place.

        `bands` are sorted, disjoint [c0, c1) ranges; row i of band k lands at
        out[bases[k] + i*(c1-c0) ...]. One scatter read (preadv) per batch of rows reads every
        band of those rows at once (the bytes between bands go to a small junk buffer), so a
        tensor split into several column bands is read once, not once per band.
        """
        row_bytes = t.nbytes // t.shape[0] if t.shape and t.shape[0] else t.nbytes
        n = r1 - r0
        segs: list[tuple[int, int, int]] = []  # (band or -1 for junk, width, base)
        pos = 0
        for k, (c0, c1) in enumerate(bands):
            if c0 > pos:
                segs.append((-1, c0 - pos, 0))
            segs.append((k, c1 - c0, bases[k]))
            pos = c1
        if pos < row_bytes:
            segs.append((-1, row_bytes - pos, 0))
        junk = scratch(max([w for k, w, _ in segs if k < 0] + [1]), "junk")
        batch = max(1, _IOV_MAX // len(segs))
        geom = (id(out.obj), id(junk.obj), row_bytes, tuple(segs))
        for i0 in range(0, n, batch):
            i1 = min(n, i0 + batch)
            key = (*geom, i0, i1)
            iov = _IOV_CACHE.get(key)
            if iov is None:
                iov = []
                for i in range(i0, i1):
                    for k, w, base in segs:
                        if k < 0:
                            iov.append(junk[:w])
                        else:
                            iov.append(out[base + i * w : base + (i + 1) * w])
                if len(_IOV_CACHE) > 64:
                    _IOV_CACHE.clear()
                _IOV_CACHE[key] = iov
            want = (i1 - i0) * row_bytes
            got = os.preadv(self.fd, iov, t.begin + (r0 + i0) * row_bytes)
            if got != want:
                raise self._fail(f"truncated (short read in tensor {t.name})")

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


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor about to be written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


def build_header(specs: list[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header (padded with spaces to 8 bytes) for tensors in this order."""
    hdr: dict[str, Any] = {}
    if metadata is not None:
        hdr["__metadata__"] = dict(metadata)
    off = 0
    for s in specs:
        if s.dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown dtype {s.dtype} for {s.name}")
        n = s.nbytes
        hdr[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


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
                n = copy(offset, min(length, _COPY_CHUNK))
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
        step = min(length, _FALLBACK_CHUNK)
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


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Just the tensor table of a file (opens and closes it)."""
    with SafetensorsReader(path) as r:
        return dict(r.tensors)
