"""Writing output safetensors files from planned regions, in parallel over N processes.

The unit of work is one output file (`OutFile`): its tensors, each a `Region` of a source tensor
plus an optional transform (FP8 dequantisation, a rewritten W8A16 weight_shape). Files are spread
over processes balanced by bytes (largest first onto the least loaded process), each process keeps
its own open source files, and the parent prints progress from per-process byte counters. Every
file is written under a temporary name, fsynced and renamed, so an interrupted run leaves no final
name that is not whole.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing as mp
import os
import queue
import shutil
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dsworker.checkpoint.fsutil import disk_error, fsync_dir, safe_join, tmp_name
from dsworker.checkpoint.progress import Progress
from dsworker.checkpoint.regions import (
    ReaderCache,
    Region,
    copy_bands,
    copy_region,
    iter_rows,
    one_pass_key,
    read_array,
)
from dsworker.checkpoint.safetensors_io import DTYPE_SIZES, SafetensorsWriter, TensorSpec
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import PlanError

if TYPE_CHECKING:
    import numpy as np


@dataclass
class OutEntry:
    """One tensor of an output file and where its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    region: Region | None
    global_shape: tuple[int, ...] = ()
    dim: int | None = None
    part: int = 0
    parts: int = 1
    source_file: str | None = None
    global_value: list[int] | None = None
    transform: str | None = None  # None | "dequant_fp8"
    scale: Region | None = None  # dequant_fp8: the whole weight_scale_inv
    block: tuple[int, int] = (128, 128)
    const: bytes | None = None  # literal bytes (a rewritten weight_shape)
    order: int = 0
    lora: tuple[Region, Region, float] | None = None  # (A [r,in], B [out,r], scale): W += s*B@A

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for s in self.shape:
            n *= s
        return n


@dataclass
class OutFile:
    """One output safetensors file (path relative to the output root)."""

    relpath: str
    entries: list[OutEntry] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)  # identical files: hard links to this one
    copy_of: str | None = None  # set on a planned file that is a copy of another

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def signature(self) -> tuple:
        """Equal signatures mean byte-identical files (same tensors, same slices, same order)."""
        return tuple(
            (
                e.name,
                e.dtype,
                e.shape,
                e.dim,
                e.part,
                e.parts,
                e.region,
                e.transform,
                e.scale,
                e.const,
            )
            for e in self.entries
        )


@dataclass(frozen=True)
class FileResult:
    relpath: str
    bytes: int
    sha256: str | None
    copies: tuple[str, ...] = ()


def replicate(path: Path, root: Path, copies: list[str], sync_dir: bool = True) -> None:
    """Give the committed file `path` its other names: a hard link, or a full copy where the file
    system refuses links. Each appears atomically (tmp name, rename)."""
    for rel in copies:
        dst = safe_join(root, rel, "output file")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(dst)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_error(e, dst) from e
            _copy_whole(path, tmp)
        os.replace(tmp, dst)
        if sync_dir:
            fsync_dir(dst.parent)


def _copy_whole(src: Path, dst: Path) -> None:
    try:
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            dst.unlink()
        raise disk_error(e, dst) from e


class _Aborted(Exception):
    pass


def _new_writer(job: OutFile, root: Path, checksum: bool) -> SafetensorsWriter:
    path = safe_join(root, job.relpath, "output file")  # backstop: never write outside `root`
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(e.name, e.dtype, e.shape) for e in job.entries]
    return SafetensorsWriter(path, specs, checksum=checksum)


class OnePass:
    """Cut each dim-1 split tensor in one pass for all the files of this process that take a band.

    Files are written one after the other, so without this a tensor split on dim 1 into `parts`
    bands (o_proj, down_proj) would be read `parts` times, once per file. Instead, when the first
    file that takes a band of it is written, every band is cut from the same chunk of rows: its own
    goes out sequentially, the others' are pwritten at their (known) offsets into the later files'
    temporary files, opened early; those files step over them when their turn comes. Memory stays
    bounded by the row chunk. Off with checksums (the hash needs the bytes in order).
    """

    MAX_OPEN = 256  # files held open early; beyond that a band waits for its own file's turn

    def __init__(self, jobs: list[OutFile], root: Path, checksum: bool) -> None:
        self.jobs = jobs
        self.root = root
        self.member: dict[tuple[int, int], tuple[str, str]] = {}
        self.groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self.done: set[tuple[int, int]] = set()
        self.writers: dict[int, SafetensorsWriter] = {}
        self._offsets: dict[int, list[int]] = {}
        if checksum:
            return
        groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for ji, j in enumerate(jobs):
            for ei, e in enumerate(j.entries):
                if e.const is not None or e.lora is not None or e.transform is not None:
                    continue
                k = one_pass_key(e.region) if e.region is not None else None
                if k is not None:
                    groups.setdefault(k, []).append((ji, ei))
        self.groups = {k: v for k, v in groups.items() if len(v) > 1}
        for k, v in self.groups.items():
            for m in v:
                self.member[m] = k

    def take(self, ji: int) -> SafetensorsWriter | None:
        """The writer opened early for job `ji`, now owned by the caller (None if none)."""
        return self.writers.pop(ji, None)

    def _writer(self, ji: int) -> SafetensorsWriter | None:
        w = self.writers.get(ji)
        if w is None and len(self.writers) < self.MAX_OPEN:
            w = self.writers[ji] = _new_writer(self.jobs[ji], self.root, False)
        return w

    def _offset(self, ji: int, ei: int, w: SafetensorsWriter) -> int:
        offs = self._offsets.get(ji)
        if offs is None:
            offs = [len(w.header)]
            for e in self.jobs[ji].entries:
                offs.append(offs[-1] + e.nbytes)
            self._offsets[ji] = offs
        return offs[ei]

    def cut(
        self,
        ji: int,
        ei: int,
        w: SafetensorsWriter,
        readers: ReaderCache,
        advance: Callable[[int], None],
    ) -> None:
        """Write entry (ji, ei) to `w` and, in the same pass, its sibling bands to later files."""
        regs: list[Region] = []
        sinks: list[Callable[[int, memoryview], None]] = []
        for m in self.groups[self.member[(ji, ei)]]:
            if m in self.done:
                continue
            e = self.jobs[m[0]].entries[m[1]]
            assert e.region is not None
            if m == (ji, ei):
                sinks.append(lambda _off, data: w.write(data))
            else:
                if m[0] < ji:  # an earlier file: always done already
                    continue
                mw = w if m[0] == ji else self._writer(m[0])
                if mw is None:
                    continue
                base = self._offset(m[0], m[1], mw)
                sinks.append(lambda off, data, mw=mw, base=base: mw.write_at(base + off, data))
            regs.append(e.region)
            self.done.add(m)
        copy_bands(regs, sinks, readers, advance)

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        self.writers.clear()


def write_outfile(
    job: OutFile,
    root: Path,
    readers: ReaderCache,
    checksum: bool,
    advance: Callable[[int], None],
    committer: Committer | None = None,
    one_pass: OnePass | None = None,
    index: int = -1,
) -> FileResult:
    """Write one planned file (tmp name, fsync, rename; the last two on `committer` if given).

    With `one_pass` (job number `index` of its jobs), dim-1 bands are cut in one pass for all files.
    """
    path = safe_join(root, job.relpath, "output file")
    w = one_pass.take(index) if one_pass is not None else None
    if w is None:
        w = _new_writer(job, root, checksum)
    try:
        for ei, e in enumerate(job.entries):
            if one_pass is not None and (index, ei) in one_pass.member:
                if (index, ei) in one_pass.done:
                    w.skip(e.nbytes)  # written by an earlier file's pass over the tensor
                else:
                    one_pass.cut(index, ei, w, readers, advance)
            elif e.const is not None:
                w.write(e.const)
                advance(len(e.const))
            elif e.lora is not None:
                _write_lora(e, w, readers, advance)
            elif e.transform == "dequant_fp8":
                _write_dequant(e, w, readers, advance)
            else:
                assert e.region is not None
                copy_region(e.region, w, readers, advance)
        if committer is None:
            size, sha = w.commit()
            replicate(path, root, job.copies)
        else:
            size, sha = w.total, (w.hash.hexdigest() if w.hash is not None else None)
            committer.submit(w, root, job.copies)
    except BaseException:
        w.abort()
        raise
    return FileResult(job.relpath, size, sha, tuple(job.copies))


class Committer:
    """fsync + rename finished files on background threads.

    The next file's copy then overlaps the disk flush of the previous ones instead of the two
    taking turns (fsync releases the GIL), concurrent fsyncs share journal commits, and each
    directory is fsynced once at the end rather than after every rename. `wait()` re-raises the
    first commit error (e.g. ENOSPC surfacing at fsync) and must run before the layout is sealed.
    """

    def __init__(self, threads: int = 4) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="commit")
        self.futures: list[Future[None]] = []
        self.dirs: set[Path] = set()

    def submit(self, w: SafetensorsWriter, root: Path, copies: list[str]) -> None:
        self.dirs.add(w.path.parent)
        self.dirs.update((root / c).parent for c in copies)

        def commit() -> None:
            w.commit(sync_dir=False)
            replicate(w.path, root, copies, sync_dir=False)

        self.futures.append(self.pool.submit(commit))

    def wait(self) -> None:
        try:
            for f in self.futures:
                f.result()
            for d in sorted(self.dirs):
                fsync_dir(d)
        finally:
            self.pool.shutdown(wait=True)


def write_all(
    jobs: list[OutFile],
    root: Path,
    readers: ReaderCache,
    checksum: bool,
    advance: Callable[[int], None],
) -> list[FileResult]:
    """Write files in order, committing each in the background; all committed on return."""
    committer = Committer()
    one_pass = OnePass(jobs, root, checksum)
    try:
        out = [
            write_outfile(j, root, readers, checksum, advance, committer, one_pass, i)
            for i, j in enumerate(jobs)
        ]
    except BaseException:
        one_pass.abort()
        with contextlib.suppress(Exception):
            committer.wait()  # finish what is written; the first error stays the one raised
        raise
    committer.wait()
    return out


def _write_dequant(
    e: OutEntry, w: SafetensorsWriter, readers: ReaderCache, advance: Callable[[int], None]
) -> None:
    """BF16 = fp8 * scale_inv[row // 128, col // 128], chunk by chunk of rows."""
    from dsworker.checkpoint import number_formats

    assert e.region is not None and e.scale is not None
    scale = _read_f32(e.scale, readers)
    reg = e.region
    for a, block in iter_rows(reg, readers):
        if reg.dim == 0:
            r0, c0 = reg.start + a, 0
        else:
            r0, c0 = a, reg.start
        out = number_formats.dequant_fp8_block(block, scale, r0, c0, e.block)
        w.write(out.tobytes())
        advance(out.nbytes)


def _read_f32(reg: Region, readers: ReaderCache) -> np.ndarray:
    """A small float tensor (an FP8 weight_scale_inv) as float32 values, whatever its float dtype."""
    from dsworker.checkpoint import number_formats

    try:
        return number_formats.float_to_f32(read_array(reg, readers), reg.dtype)
    except ValueError as e:
        where = f"{reg.pieces[0].path}: {reg.pieces[0].name}" if reg.pieces else "scale"
        raise CheckpointError(f"{where}: {e}; the checkpoint's scales must be float") from None


def _to_f32(block: np.ndarray, dtype: str) -> np.ndarray:
    import numpy as np

    from dsworker.checkpoint import number_formats

    if dtype == "BF16":
        return number_formats.bf16_to_f32(block.view("<u2"))
    if dtype == "F16":
        return block.view("<f2").astype(np.float32)
    if dtype == "F32":
        return block.view("<f4").astype(np.float32)
    raise CheckpointError(f"cannot do float math on {dtype} weights")


def _from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    from dsworker.checkpoint import number_formats

    if dtype == "BF16":
        return number_formats.f32_to_bf16(x)
    if dtype == "F16":
        return x.astype("<f2")
    return x.astype("<f4")


def _write_lora(
    e: OutEntry, w: SafetensorsWriter, readers: ReaderCache, advance: Callable[[int], None]
) -> None:
    """W' = W + s * B @ A in float32, one rounding to the output dtype, chunk by chunk of rows.

    The region may be a slice of the weight (a sharded layout): a dim-0 slice takes B's matching
    rows, a dim-1 slice A's matching columns. An FP8 source weight (e.scale set) is dequantised
    first; the result is BF16.
    """
    import numpy as np

    from dsworker.checkpoint import number_formats

    assert e.region is not None and e.lora is not None
    a_reg, b_reg, s = e.lora
    a = _to_f32(read_array(a_reg, readers).view(np.uint8), a_reg.dtype).reshape(a_reg.shape)
    b = _to_f32(read_array(b_reg, readers).view(np.uint8), b_reg.dtype).reshape(b_reg.shape)
    scale = _read_f32(e.scale, readers) if e.scale is not None else None
    reg = e.region
    row_off, col_off = (reg.start, 0) if reg.dim == 0 else (0, reg.start)
    if reg.dim != 0:
        a = np.ascontiguousarray(a[:, reg.start : reg.stop])
    for r0, block in iter_rows(reg, readers):
        g0 = row_off + r0
        if scale is not None:
            wf = number_formats.fp8_e4m3_to_f32(block) * number_formats.expand_block_scale(
                scale, g0, g0 + block.shape[0], col_off, col_off + block.shape[1], e.block
            )
        else:
            wf = _to_f32(block, reg.dtype).reshape(block.shape[0], -1)
        wf = wf + np.float32(s) * (b[g0 : g0 + wf.shape[0]] @ a)
        out = _from_f32(wf, e.dtype)
        w.write(out.tobytes())
        advance(out.nbytes)


def balance(jobs: list[OutFile], n: int) -> list[list[OutFile]]:
    """Largest file first onto the least loaded process (LPT): near-equal bytes per process."""
    bins: list[list[OutFile]] = [[] for _ in range(n)]
    loads = [0] * n
    for j in sorted(jobs, key=lambda j: -j.nbytes):
        i = loads.index(min(loads))
        bins[i].append(j)
        loads[i] += j.nbytes
    return [b for b in bins if b]


def _worker(
    idx: int,
    jobs: list[OutFile],
    root: Path,
    checksum: bool,
    counters: object,
    abort: object,
    results: mp.Queue,
) -> None:
    readers = ReaderCache()

    def advance(nb: int) -> None:
        counters[idx] += nb  # type: ignore[index]
        if abort.value:  # type: ignore[attr-defined]
            raise _Aborted()

    try:
        out = write_all(jobs, root, readers, checksum, advance)
        results.put(("ok", idx, out))
    except _Aborted:
        results.put(("aborted", idx, None))
    except (CheckpointError, PlanError) as e:
        results.put(("error", idx, str(e)))
    except BaseException:
        results.put(("crash", idx, traceback.format_exc()))
    finally:
        readers.close()


def run_jobs(
    jobs: list[OutFile],
    root: Path,
    processes: int = 1,
    checksum: bool = False,
    what: str = "shard",
    progress_interval: float | None = None,
) -> list[FileResult]:
    """Write every planned file under `root` with up to `processes` processes; raise on failure."""
    total = sum(j.nbytes for j in jobs)
    prog = Progress(what, total, progress_interval)
    bins = balance(jobs, max(1, min(processes, len(jobs))))
    if len(bins) <= 1:
        done = 0
        readers = ReaderCache()

        def advance(nb: int) -> None:
            nonlocal done
            done += nb
            prog.maybe_log(done)

        try:
            out = write_all(jobs, root, readers, checksum, advance)
        finally:
            readers.close()
        prog.maybe_log(done, force=True)
        return out
    ctx = mp.get_context("fork")
    counters = ctx.Array("q", len(bins), lock=False)
    abort = ctx.Value("b", 0, lock=False)
    results: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(i, b, root, checksum, counters, abort, results),
            name=f"{what}-{i}",
            daemon=True,
        )
        for i, b in enumerate(bins)
    ]
    for p in procs:
        p.start()
    pending = set(range(len(procs)))
    out: list[FileResult] = []
    error: Exception | None = None
    try:
        while pending:
            try:
                kind, idx, payload = results.get(timeout=min(prog.interval, 1.0))
            except queue.Empty:
                for i in list(pending):
                    if not procs[i].is_alive() and procs[i].exitcode not in (0, None):
                        pending.discard(i)
                        abort.value = 1
                        error = error or RuntimeError(
                            f"{what} worker {i} died (exit code {procs[i].exitcode}); "
                            "out of memory? lower --processes"
                        )
                prog.maybe_log(sum(counters))
                continue
            pending.discard(idx)
            if kind == "ok":
                out.extend(payload)
            elif kind == "error":
                abort.value = 1
                error = error or CheckpointError(payload)
            elif kind == "crash":
                abort.value = 1
                error = error or RuntimeError(f"{what} worker {idx} failed:\n{payload}")
            prog.maybe_log(sum(counters))
    finally:
        if error is not None or pending:
            abort.value = 1
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    if error is not None:
        raise error
    prog.maybe_log(sum(counters), force=True)
    return out


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
