"""Writing the planned files in parallel over N forked processes, with progress from the parent.

Files are spread over processes balanced by bytes (largest first onto the least loaded process),
each process keeps its own open source files, and the parent prints progress from per-process byte
counters. The first failure stops every process; nothing is sealed by this module.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from dsworker.checkpoint.outfile_writer import write_all
from dsworker.checkpoint.planned_files import FileResult, OutFile
from dsworker.checkpoint.progress import Progress
from dsworker.checkpoint.regions import ReaderCache
from dsworker.contract.errors import CheckpointError, PlanError


class _Aborted(Exception):
    pass


def balance(jobs: list[OutFile], n: int) -> list[list[OutFile]]:
    """Largest file first onto the least loaded process (LPT): near-equal bytes per process."""
    bins: list[list[OutFile]] = [[] for _ in range(n)]
    loads = [0] * n
    for j in sorted(jobs, key=lambda j: -j.nbytes):
        i = loads.index(min(loads))
        bins[i].append(j)
        loads[i] += j.nbytes
    return [b for b in bins if b]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _worker(
    idx: int,
    jobs: list[OutFile],
    root: Path,
    checksum: bool,
    counters: Any,
    abort: Any,
    results: mp.Queue,
) -> None:
    readers = ReaderCache()

    def advance(nb: int) -> None:
        counters[idx] += nb
        if abort.value:
            raise _Aborted()

    try:
        out = write_all(jobs, root, readers, checksum, advance)
        results.put(("ok", idx, out))
    except _Aborted:
        results.put(("aborted", idx, None))
    except (CheckpointError, PlanError) as e:
        results.put(("error", idx, (str(e), e.reason)))
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
    prog = Progress(what, sum(j.nbytes for j in jobs), progress_interval)
    bins = balance(jobs, max(1, min(processes, len(jobs))))
    if len(bins) <= 1:
        return _run_here(jobs, root, checksum, prog)
    return _Forked(bins, root, checksum, what, prog).run()


def _run_here(jobs: list[OutFile], root: Path, checksum: bool, prog: Progress) -> list[FileResult]:
    """One process: no fork, progress straight from the byte counter."""
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


@dataclass
class _Forked:
    """The parent's side of a forked run: start, collect results, stop everything on a failure."""

    bins: list[list[OutFile]]
    root: Path
    checksum: bool
    what: str
    prog: Progress

    def run(self) -> list[FileResult]:
        ctx = mp.get_context("fork")
        self.counters = ctx.Array("q", len(self.bins), lock=False)
        self.abort = ctx.Value("b", 0, lock=False)
        self.results: mp.Queue = ctx.Queue()
        self.procs: list[BaseProcess] = [
            ctx.Process(
                target=_worker,
                args=(i, b, self.root, self.checksum, self.counters, self.abort, self.results),
                name=f"{self.what}-{i}",
                daemon=True,
            )
            for i, b in enumerate(self.bins)
        ]
        for p in self.procs:
            p.start()
        self.pending = set(range(len(self.procs)))
        self.error: Exception | None = None
        out: list[FileResult] = []
        try:
            while self.pending:
                self._collect(out)
        finally:
            self._stop()
        if self.error is not None:
            raise self.error
        self.prog.maybe_log(sum(self.counters), force=True)
        return out

    def _fail(self, error: Exception) -> None:
        self.abort.value = 1
        self.error = self.error or error

    def _collect(self, out: list[FileResult]) -> None:
        """One result (or a check for dead workers when none comes within the interval)."""
        try:
            kind, idx, payload = self.results.get(timeout=min(self.prog.interval, 1.0))
        except queue.Empty:
            for i in list(self.pending):
                code = self.procs[i].exitcode
                if not self.procs[i].is_alive() and code not in (0, None):
                    self.pending.discard(i)
                    self._fail(
                        RuntimeError(
                            f"{self.what} worker {i} died (exit code {code}); "
                            "out of memory? lower --processes"
                        )
                    )
            self.prog.maybe_log(sum(self.counters))
            return
        self.pending.discard(idx)
        if kind == "ok":
            out.extend(payload)
        elif kind == "error":
            message, reason = payload
            self._fail(CheckpointError(message, reason=reason))
        elif kind == "crash":
            self._fail(RuntimeError(f"{self.what} worker {idx} failed:\n{payload}"))
        self.prog.maybe_log(sum(self.counters))

    def _stop(self) -> None:
        if self.error is not None or self.pending:
            self.abort.value = 1
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
