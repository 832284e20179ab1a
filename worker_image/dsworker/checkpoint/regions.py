"""Logical tensors stored in pieces, and the bounded-memory copy of any slice of them.

Sharding (one whole source tensor -> a slice), merging (slices -> the whole) and resharding (slices
of plan A -> slices of plan B) are one operation here: a `GlobalTensor` knows which files hold which
range of it along one dim; `region()` picks the pieces that cover a wanted range; `copy_region()`
writes them into a `SafetensorsWriter`. Contiguous pieces (dim-0 ranges) go through in-kernel
copy_file_range; strided ones (dim-1 ranges) through row chunks of at most CHUNK_BYTES, so memory is
bounded by the chunk, never by the tensor or the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dsworker.checkpoint.io_buffers import scratch
from dsworker.checkpoint.safetensors_format import NUMPY_DTYPES, TensorInfo, nbytes_of
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.checkpoint.safetensors_writer import SafetensorsWriter

if TYPE_CHECKING:
    import numpy as np

CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class SourcePart:
    """Tensor `name` in file `path` holds the global range [start, stop) along `dim` (None = whole)."""

    path: str
    name: str
    dim: int | None
    start: int
    stop: int


@dataclass
class GlobalTensor:
    """A tensor of the full model, wherever its bytes are (one HF file, or several shards)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: list[SourcePart]
    source_file: str | None = None  # the HF file it came from (merge writes it back there)
    value: list[int] | None = None  # W8A16 weight_shape: the global value
    order: int = 0  # position in the source (keeps reads sequential)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass(frozen=True)
class Piece:
    """Source-local range [lo, hi) along the region's dim of one stored tensor."""

    path: str
    name: str
    lo: int
    hi: int


@dataclass(frozen=True)
class Region:
    """The box global[dim in [start, stop)] of a tensor, as pieces in order along dim."""

    dtype: str
    global_shape: tuple[int, ...]
    dim: int  # 0 for a whole tensor
    start: int
    stop: int
    pieces: tuple[Piece, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        if not self.global_shape:
            return ()
        s = list(self.global_shape)
        s[self.dim] = self.stop - self.start
        return tuple(s)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


def region(gt: GlobalTensor, dim: int | None, start: int = 0, stop: int | None = None) -> Region:
    """The pieces of `gt` that cover [start, stop) on `dim` (dim None = the whole tensor)."""
    split = [p for p in gt.parts if p.dim is not None]
    whole = [p for p in gt.parts if p.dim is None]
    if dim is None:
        dim = split[0].dim if (split and not whole) else 0
        start, stop = 0, (gt.shape[dim] if gt.shape else 0)
    assert dim is not None
    if stop is None:
        stop = gt.shape[dim]
    if not gt.shape:  # a scalar
        p = gt.parts[0]
        return Region(gt.dtype, gt.shape, 0, 0, 0, (Piece(p.path, p.name, 0, 0),))
    if whole:
        p = whole[0]
        return Region(gt.dtype, gt.shape, dim, start, stop, (Piece(p.path, p.name, start, stop),))
    if any(p.dim != dim for p in split):
        raise ValueError(f"{gt.name}: stored split on dim {split[0].dim}, cannot cut on dim {dim}")
    pieces: list[Piece] = []
    covered = start
    for p in sorted(split, key=lambda p: p.start):
        lo, hi = max(start, p.start), min(stop, p.stop)
        if hi <= lo or lo < covered:
            continue
        if lo != covered:
            break
        pieces.append(Piece(p.path, p.name, lo - p.start, hi - p.start))
        covered = hi
    if covered != stop and start != stop:
        raise ValueError(f"{gt.name}: stored parts do not cover [{start}, {stop}) on dim {dim}")
    return Region(gt.dtype, gt.shape, dim, start, stop, tuple(pieces))


@dataclass
class ReaderCache:
    """Open readers by path, one set per process (file descriptors do not cross fork safely)."""

    readers: dict[str, SafetensorsReader] = field(default_factory=dict)

    def get(self, path: str) -> SafetensorsReader:
        r = self.readers.get(path)
        if r is None:
            r = self.readers[path] = SafetensorsReader(path)
        return r

    def info(self, piece: Piece) -> tuple[SafetensorsReader, TensorInfo]:
        r = self.get(piece.path)
        return r, r.info(piece.name)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()


def _row_view(reg: Region) -> tuple[int, int]:
    """(outer rows, bytes of the region per outer row) when the region is viewed as 2D."""
    if reg.dim == 0 or len(reg.global_shape) <= 1:
        return 1, reg.nbytes
    if reg.dim != 1:
        raise ValueError(f"splits on dim {reg.dim} are not supported")
    inner = reg.nbytes // reg.global_shape[0] if reg.global_shape[0] else 0
    return reg.global_shape[0], inner


def copy_region(
    reg: Region,
    w: SafetensorsWriter,
    readers: ReaderCache,
    advance: Callable[[int], None] = lambda n: None,
    chunk_bytes: int | None = None,
) -> None:
    """Append the bytes of `reg` to `w`: in-kernel copies for contiguous pieces, row chunks otherwise."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    outer, _ = _row_view(reg)
    if outer == 1:
        for pc in reg.pieces:
            r, t = readers.info(pc)
            _check_piece(reg, pc, t)
            unit = t.nbytes // t.shape[reg.dim] if t.shape and t.shape[reg.dim] else 0
            off, length = t.begin + pc.lo * unit, (pc.hi - pc.lo) * unit
            while length > 0:
                n = min(length, chunk_bytes)
                w.copy_from(r.fd, off, n)
                advance(n)
                off += n
                length -= n
        return
    # A dim-1 band of every piece, rows side by side, through scatter reads (no numpy).
    outer, row_out = _row_view(reg)
    step = max(1, chunk_bytes // max(row_out, 1))
    infos = [(pc, *readers.info(pc)) for pc in reg.pieces]
    for pc, _, t in infos:
        _check_piece(reg, pc, t)
    for a in range(0, outer, step):
        b = min(outer, a + step)
        out = scratch((b - a) * row_out, "rows")[: (b - a) * row_out]
        col = 0
        for pc, r, t in infos:
            unit = t.nbytes // (t.shape[0] * t.shape[1]) if t.shape[0] * t.shape[1] else 0
            width = (pc.hi - pc.lo) * unit
            r.read_bands(t, a, b, [(pc.lo * unit, pc.hi * unit)], out, [col], [row_out])
            col += width
        w.write(out)
        advance(len(out))


def one_pass_key(reg: Region) -> tuple[str, str] | None:
    """(file, stored tensor) when `reg` is a dim-1 band of a single stored tensor, else None.

    Regions with the same key are column bands of the same rows: `copy_bands` cuts them all in one
    pass over the stored tensor instead of one pass per band.
    """
    if reg.dim != 1 or len(reg.global_shape) < 2 or len(reg.pieces) != 1:
        return None
    pc = reg.pieces[0]
    return pc.path, pc.name


def copy_bands(
    regs: list[Region],
    sinks: list[Callable[[int, memoryview], None]],
    readers: ReaderCache,
    advance: Callable[[int], None] = lambda n: None,
    chunk_bytes: int | None = None,
) -> None:
    """Cut several dim-1 bands of one stored tensor (same `one_pass_key`) in one pass over it.

    Rows are read a chunk of at most `chunk_bytes` (of band bytes) at a time with scatter reads
    that put each band's columns straight into its part of a reused buffer; each band's bytes go
    to its sink as (byte offset within that region, bytes). Identical bands are read once and go
    to every sink that takes them. Memory is bounded by the chunk; no numpy.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    keys = {one_pass_key(reg) for reg in regs}
    assert len(keys) == 1 and None not in keys, keys
    r, t = readers.info(regs[0].pieces[0])
    for reg in regs:
        _check_piece(reg, reg.pieces[0], t)
    rows = t.shape[0]
    if rows == 0 or t.nbytes == 0:
        return
    row_bytes = t.nbytes // rows
    unit = row_bytes // t.shape[1] if t.shape[1] else 0
    cols = [(reg.pieces[0].lo * unit, reg.pieces[0].hi * unit) for reg in regs]
    # one pass per set of disjoint bands (bands of one split never overlap: one pass in practice)
    passes: list[list[tuple[int, int]]] = []
    for c in sorted({c for c in cols if c[1] > c[0]}):
        for p in passes:
            if p[-1][1] <= c[0]:
                p.append(c)
                break
        else:
            passes.append([c])
    for bands in passes:
        widths = [c1 - c0 for c0, c1 in bands]
        step = max(1, min(rows, chunk_bytes // sum(widths)))
        bases = [step * sum(widths[:k]) for k in range(len(bands))]
        buf = scratch(step * sum(widths), "bands")
        targets = [
            (bands.index(c), sink) for c, sink in zip(cols, sinks, strict=True) if c in bands
        ]
        for a in range(0, rows, step):
            b = min(rows, a + step)
            r.read_bands(t, a, b, bands, buf, bases)
            for k, sink in targets:
                n = (b - a) * widths[k]
                sink(a * widths[k], buf[bases[k] : bases[k] + n])
                advance(n)


def _check_piece(reg: Region, pc: Piece, t: TensorInfo) -> None:
    if t.dtype != reg.dtype:
        raise ValueError(f"{t.name} in {pc.path}: dtype {t.dtype}, expected {reg.dtype}")


def iter_rows(
    reg: Region, readers: ReaderCache, chunk_bytes: int | None = None, reuse: bool = True
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row, uint8 [rows, row bytes]) chunks of the region viewed as 2D [shape[0], rest].

    Rows are region-local. For a dim-0 region each chunk comes from one piece; for a dim-1 region each
    chunk holds the same rows of every piece side by side. With reuse=True the chunks are views of
    one per-process buffer: consume each before asking for the next.
    """
    import numpy as np

    chunk_bytes = chunk_bytes or CHUNK_BYTES
    shape = reg.shape
    if not shape or shape[0] == 0:
        for pc in reg.pieces:
            r, t = readers.info(pc)
            if t.nbytes:
                yield 0, np.frombuffer(r.read(t), np.uint8).reshape(1, -1)
        return
    row_bytes = reg.nbytes // shape[0]
    step = max(1, min(shape[0], chunk_bytes // max(row_bytes, 1)))

    def block(n: int) -> np.ndarray:
        if not reuse:
            return np.empty((n, row_bytes), np.uint8)
        buf = np.frombuffer(scratch(step * row_bytes, "rows"), np.uint8)
        return buf[: n * row_bytes].reshape(n, row_bytes)

    if reg.dim == 0 or len(shape) == 1:
        row = 0
        for pc in reg.pieces:
            r, t = readers.info(pc)
            _check_piece(reg, pc, t)
            full = t.nbytes // t.shape[0] if t.shape[0] else 0
            for a in range(pc.lo, pc.hi, step):
                b = min(pc.hi, a + step)
                yield row, r.rows(t, a, b, 0, full, block(b - a))
                row += b - a
        return
    infos = [(pc, *readers.info(pc)) for pc in reg.pieces]
    for pc, _, t in infos:
        _check_piece(reg, pc, t)
    for a in range(0, shape[0], step):
        b = min(shape[0], a + step)
        out = block(b - a)
        col = 0
        for pc, r, t in infos:
            unit = t.itemsize * int(np.prod(t.shape[2:], dtype=np.int64))
            width = (pc.hi - pc.lo) * unit
            r.rows(t, a, b, pc.lo * unit, pc.hi * unit, out[:, col : col + width])
            col += width
        yield a, out


def read_array(reg: Region, readers: ReaderCache) -> np.ndarray:
    """A (small) region as a numpy array of its dtype (BF16 as uint16 bits)."""
    import numpy as np

    blocks = [b for _, b in iter_rows(reg, readers, 1 << 62, reuse=False)]
    raw = b"".join(b.tobytes() for b in blocks)
    return np.frombuffer(raw, NUMPY_DTYPES[reg.dtype]).reshape(reg.shape)


__all__ = [
    "CHUNK_BYTES",
    "GlobalTensor",
    "Piece",
    "ReaderCache",
    "Region",
    "SourcePart",
    "copy_bands",
    "copy_region",
    "iter_rows",
    "one_pass_key",
    "read_array",
    "region",
]
