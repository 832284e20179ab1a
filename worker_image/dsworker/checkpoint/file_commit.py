"""Committing finished output files: fsync and rename off the copy path, then their other names.

The next file's copy overlaps the disk flush of the previous ones instead of the two taking turns
(fsync releases the GIL), concurrent fsyncs share journal commits, and each directory is fsynced
once at the end rather than after every rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dsworker.checkpoint.fsutil import disk_error, fsync_dir, safe_join, tmp_name
from dsworker.checkpoint.safetensors_writer import SafetensorsWriter


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


class Committer:
    """fsync + rename finished files on background threads.

    `wait()` re-raises the first commit error (e.g. ENOSPC surfacing at fsync) and must run before
    the layout is sealed.
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
