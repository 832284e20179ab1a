"""Small file-system helpers: names that cannot escape a directory, safe reads, atomic writes.

Every file name the tools take from input (an index's weight_map, a metadata file's file list) is
checked here before it is joined to a directory, so a crafted checkpoint cannot make the sharder
read or write outside the directories it was given. Files are read only when they are regular
files (a FIFO would block the open or the read forever, a device never ends), and a file of a
model directory only when it resolves inside it (no symlink to /proc/self/environ ends up in the
store).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from dsworker.contract import strict_json
from dsworker.contract.errors import STORAGE_FULL, STORAGE_NOT_WRITABLE, CheckpointError

_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def safe_join(root: str | os.PathLike[str], rel: str, what: str) -> Path:
    """root/rel, refusing names that are absolute, contain '..' or odd characters.

    `what` says where the name came from (e.g. "model.safetensors.index.json weight_map") so the
    error can point at the file to fix.
    """
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{what}: empty or non-string file name {rel!r}; fix the file list")
    bad = (
        rel.startswith(("/", "\\"))
        or "\\" in rel
        or "\x00" in rel
        or any(part in ("", ".", "..") for part in rel.split("/"))
    )
    if bad:
        raise CheckpointError(
            f"{what}: file name {rel!r} would escape the checkpoint directory; "
            "names must be plain relative paths without '..'"
        )
    return Path(root) / rel


def check_tensor_name(name: str, where: str) -> None:
    """Tensor names end up in file lists and log lines; refuse anything that is not a plain dotted name."""
    if not isinstance(name, str) or not _TENSOR_NAME.match(name) or ".." in name.split("."):
        raise CheckpointError(
            f"{where}: tensor name {name!r} is not a plain dotted name (letters, digits, '_', '-', '.'); "
            "it could be used to escape a directory - fix the checkpoint"
        )


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename durable: fsync the directory that holds the new name."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name, fsync, rename: readers see the old file or the whole new one."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise disk_error(e, path) from e
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def copy_file_atomic(src: Path, dst: Path) -> int:
    """Copy one small auxiliary file (config, tokenizer) atomically; returns its size."""
    tmp = tmp_name(dst)
    fi = os.fdopen(open_regular(src, "side file"), "rb")
    try:
        with fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise disk_error(e, dst) from e
    return dst.stat().st_size


def disk_error(e: OSError, path: Path | str) -> Exception:
    """Turn ENOSPC/EDQUOT/EROFS into a CheckpointError that says what to do; keep other errors."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(
            f"disk full while writing {path}: {os.strerror(e.errno)}; "
            "give the shard store more space (or remove old shards) and re-run",
            reason=STORAGE_FULL,
        )
    if e.errno == errno.EROFS:
        return CheckpointError(
            f"cannot write {path}: read-only file system; mount the target writable",
            reason=STORAGE_NOT_WRITABLE,
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(
            f"cannot write {path}: permission denied; fix the target's ownership",
            reason=STORAGE_NOT_WRITABLE,
        )
    return e


def load_json(path: Path, what: str) -> Any:
    """Read a JSON file strictly (no duplicate keys), or raise a CheckpointError naming it."""
    try:
        return strict_json.loads(read_regular(path, what))
    except strict_json.JsonError as e:
        raise CheckpointError(f"{path}: {what}: {e}; re-download or fix it") from None


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def _not_regular(path: str | os.PathLike[str], what: str, kind: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what} is a {kind}, not a regular file; replace it with the file itself"
    )


def open_regular(path: str | os.PathLike[str], what: str) -> int:
    """A read-only fd of `path`, refusing anything but a regular file, without ever blocking.

    O_NONBLOCK lets the open of a FIFO return at once (it has no effect on a regular file); the
    fstat then refuses it. Missing or unreadable files raise CheckpointError naming `what`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except PermissionError:
        raise CheckpointError(f"{path}: {what} is not readable (permission denied)") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket (or a device without a driver)
            raise _not_regular(path, what, "socket or device") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, what, _kind(mode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of a regular file (see open_regular)."""
    with os.fdopen(open_regular(path, what), "rb") as f:
        return f.read()


def inside(root: str | os.PathLike[str], path: Path, what: str) -> Path:
    """`path`, refusing one that resolves (through symlinks) outside `root`."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise CheckpointError(
            f"{path}: {what} is a symbolic link to {real}, outside {root}; put the file itself "
            "in the model directory (only files inside it are read)"
        )
    return path


def member_file(root: Path, rel: str, what: str) -> Path:
    """root/rel for a file that must be a regular file inside `root` (symlinks within it are fine)."""
    path = inside(root, safe_join(root, rel, what), what)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found (or a broken link)") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(path, what, _kind(mode))
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path, "file"), "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()
