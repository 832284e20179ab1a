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

from .errors import CheckpointError
from .fsutil import disk_error, fsync_dir, tmp_name
from .layout import PlanError
from .progress import Progress
from .regions import ReaderCache, Region, copy_region, iter_rows, read_array
from .safetensors_io import DTYPE_SIZES, SafetensorsWriter, TensorSpec

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
        dst = root / rel
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


def write_outfile(
    job: OutFile,
    root: Path,
    readers: ReaderCache,
    checksum: bool,
    advance: Callable[[int], None],
    committer: Committer | None = None,
) -> FileResult:
    """Write one planned file (tmp name, fsync, rename; the last two on `committer` if given)."""
    path = root / job.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(e.name, e.dtype, e.shape) for e in job.entries]
    w = SafetensorsWriter(path, specs, checksum=checksum)
    try:
        for e in job.entries:
            if e.const is not None:
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
    try:
        out = [write_outfile(j, root, readers, checksum, advance, committer) for j in jobs]
    except BaseException:
        with contextlib.suppress(Exception):
            committer.wait()  # finish what is written; the first error stays the one raised
        raise
    committer.wait()
    return out


def _write_dequant(
    e: OutEntry, w: SafetensorsWriter, readers: ReaderCache, advance: Callable[[int], None]
) -> None:
    """BF16 = fp8 * scale_inv[row // 128, col // 128], chunk by chunk of rows."""
    import numpy as np

    from . import quant

    assert e.region is not None and e.scale is not None
    scale = read_array(e.scale, readers).astype(np.float32)
    reg = e.region
    for a, block in iter_rows(reg, readers):
        if reg.dim == 0:
            r0, c0 = reg.start + a, 0
        else:
            r0, c0 = a, reg.start
        out = quant.dequant_fp8_block(block, scale, r0, c0, e.block)
        w.write(out.tobytes())
        advance(out.nbytes)


def _to_f32(block: np.ndarray, dtype: str) -> np.ndarray:
    import numpy as np

    from . import quant

    if dtype == "BF16":
        return quant.bf16_to_f32(block.view("<u2"))
    if dtype == "F16":
        return block.view("<f2").astype(np.float32)
    if dtype == "F32":
        return block.view("<f4").astype(np.float32)
    raise CheckpointError(f"cannot do float math on {dtype} weights")


def _from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    from . import quant

    if dtype == "BF16":
        return quant.f32_to_bf16(x)
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

    from . import quant

    assert e.region is not None and e.lora is not None
    a_reg, b_reg, s = e.lora
    a = _to_f32(read_array(a_reg, readers).view(np.uint8), a_reg.dtype).reshape(a_reg.shape)
    b = _to_f32(read_array(b_reg, readers).view(np.uint8), b_reg.dtype).reshape(b_reg.shape)
    scale = read_array(e.scale, readers).astype(np.float32) if e.scale is not None else None
    reg = e.region
    row_off, col_off = (reg.start, 0) if reg.dim == 0 else (0, reg.start)
    if reg.dim != 0:
        a = np.ascontiguousarray(a[:, reg.start : reg.stop])
    for r0, block in iter_rows(reg, readers):
        g0 = row_off + r0
        if scale is not None:
            wf = quant.fp8_e4m3_to_f32(block) * quant.expand_block_scale(
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
