"""Small file-system helpers: names that cannot escape a directory, atomic writes, fsync.

Every file name the tools take from input (an index's weight_map, a metadata file's file list) is
checked here before it is joined to a directory, so a crafted checkpoint cannot make the sharder
read or write outside the directories it was given.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from dsworker.contract.errors import CheckpointError

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
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
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
            "give the shard store more space (or remove old shards) and re-run"
        )
    if e.errno == errno.EROFS:
        return CheckpointError(
            f"cannot write {path}: read-only file system; mount the target writable"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(
            f"cannot write {path}: permission denied; fix the target's ownership"
        )
    return e


def load_json(path: Path, what: str) -> Any:
    """Read a JSON file, or raise a CheckpointError naming it."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: {what} is not valid JSON ({e}); re-download or fix it"
        ) from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: {what} is a directory, expected a file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: {what} is not readable (permission denied)") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()
