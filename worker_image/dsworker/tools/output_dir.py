"""The output directory of a layout: one writer at a time, safe re-runs, enough space.

A re-run over a complete layout of the same plan is a no-op; over our own partial output it starts
clean; anything else in the directory is refused, never wiped. The lock and the in-progress marker
keep a second writer and a crash from sealing `_COMPLETE` over missing shards.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dsworker.checkpoint.fsutil import disk_error, fsync_dir
from dsworker.checkpoint.planned_files import OutFile
from dsworker.checkpoint.sharded_metadata import is_complete, plan_mismatch, read_metadata
from dsworker.contract.errors import STORAGE_FULL, CheckpointError, OutputBusyError
from dsworker.contract.layout import COMPLETE_MARKER, METADATA_FILE
from dsworker.tools.verify import verify_sharded

IN_PROGRESS_MARKER = ".dsop-sharding"
LOCK_SUFFIX = ".dsop-lock"
IGNORABLE = {"lost+found"}


def _entries(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.iterdir() if p.name not in IGNORABLE)


def _wipe(dst: Path) -> None:
    """Empty `dst`, unsealing it first: a crash mid-wipe must never leave `_COMPLETE` over missing
    shards. The metadata and in-progress marker go last, so a half-wiped directory still reads as
    our partial layout (wiped again on the next run) rather than as foreign content."""
    with contextlib.suppress(FileNotFoundError):
        (dst / COMPLETE_MARKER).unlink()
    fsync_dir(dst)
    last = (METADATA_FILE, IN_PROGRESS_MARKER)
    for p in sorted(dst.iterdir(), key=lambda p: p.name in last):
        if p.name in IGNORABLE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    fsync_dir(dst)


def lock_path(dst: str | Path) -> Path:
    """The lock file of an output directory: beside it (so wiping the directory keeps the lock)."""
    real = Path(os.path.realpath(dst))
    return real.parent / f".{real.name}{LOCK_SUFFIX}"


NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})  # no flock here


@contextlib.contextmanager
def output_lock(dst: str | Path) -> Iterator[Path]:
    """Hold an exclusive flock on `dst`'s lock file while writing `dst`.

    Two writers on one directory would wipe each other's live files and could seal `_COMPLETE`
    over missing shards; the second one is refused (OutputBusyError, exit 75) instead. The lock
    dies with its process (and its forked writers), so a killed run never leaves a stale lock.
    """
    lock = lock_path(dst)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise disk_error(e, lock) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in NO_LOCKS:
                # Some stores (NFS mounted nolock, some FUSE/CSI drivers) have no locks: the
                # sharder still works there, one writer at a time being up to the caller.
                print(
                    f"warning: {lock}: the file system cannot lock ({e.strerror}); going on "
                    "without it",
                    file=sys.stderr,
                )
                yield lock
                return
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise disk_error(e, lock) from e
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            raise OutputBusyError(
                f"{dst}: another dsworker run is writing this directory (lock {lock} is held"
                + (f" by pid {holder}" if holder else "")
                + "); wait for it to finish and re-run (a finished layout is reused), "
                "or choose another --save-directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)


def prepare_output(dst: Path, fingerprint: str, plan_d: dict[str, Any]) -> bool:
    """Make `dst` ready for a fresh layout; True when it already holds this complete layout.

    Call with `output_lock(dst)` held. Complete and verified -> True (nothing to do). Ours but partial (in-progress marker or metadata
    without a valid `_COMPLETE`) or complete but failing verification -> wiped. Complete for another
    plan, or not empty and not ours -> refused.
    """
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(
            f"{dst}: exists and is not a directory; choose another --save-directory"
        )
    dst.mkdir(parents=True, exist_ok=True)
    names = _entries(dst)
    if not names:
        return False
    if is_complete(dst):
        md = read_metadata(dst)
        diffs = plan_mismatch(md.plan, plan_d)
        if md.fingerprint != fingerprint:
            diffs.append(f"fingerprint: {md.fingerprint[:16]}... vs {fingerprint[:16]}...")
        if md.plan.get("ranks") != plan_d.get("ranks"):
            diffs.append(
                f"ranks: {md.plan.get('ranks') or 'all'} vs {plan_d.get('ranks') or 'all'}"
            )
        if diffs:
            raise CheckpointError(
                f"{dst}: already holds a complete layout for another plan ({'; '.join(diffs)}); "
                "use a new --save-directory or delete this one"
            )
        problems = verify_sharded(dst)
        if not problems:
            return True
        print(
            f"shard: {dst} is complete but fails verification ({problems[0]}); re-sharding",
            file=sys.stderr,
        )
        _wipe(dst)
        return False
    if IN_PROGRESS_MARKER in names or METADATA_FILE in names:
        print(
            f"shard: {dst} holds a partial layout from an interrupted run; starting clean",
            file=sys.stderr,
        )
        _wipe(dst)
        return False
    raise CheckpointError(
        f"{dst}: not empty and not written by dsworker shard (found {', '.join(names[:3])}); "
        "choose an empty --save-directory"
    )


def check_space(dst: Path, jobs: list[OutFile], aux_bytes: Sequence[int] = ()) -> None:
    """Refuse early when the target clearly cannot hold the layout (file systems that report no
    size, f_blocks == 0, are trusted; ENOSPC while writing is still reported clearly).
    `aux_bytes`: the sizes of the files copied beside the shards (config, tokenizer)."""
    st = os.statvfs(dst)
    free = st.f_bavail * st.f_frsize
    blk = max(st.f_frsize, 1)
    need = sum(-(-(j.nbytes + 128 * len(j.entries) + 64) // blk) * blk for j in jobs)
    need += sum(-(-n // blk) * blk for n in aux_bytes)
    if st.f_blocks and free < need:
        raise CheckpointError(
            f"{dst}: not enough space: the layout needs {need / 1e9:.3f} GB, {free / 1e9:.3f} GB free; "
            "enlarge the shard store or remove old shards",
            reason=STORAGE_FULL,
        )
