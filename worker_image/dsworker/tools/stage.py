"""`dsworker stage`: copy one pod's ranks from the shard store into tmpfs before the engine starts.

The worker pod's init container runs this: only the directories its own ranks read (plus the small
top-level files) are copied, so host memory holds ~1/nodes of the checkpoint. The store is trusted
only when its `_COMPLETE` seals its metadata, and only what that metadata lists is copied (names
checked against the rank arithmetic and kept inside the store and --dest, sizes checked). The copy
is sealed the same way as the store (`_COMPLETE` = sha256 of the copied metadata file), last; a
rerun over a sealed copy of the same metadata that holds this pod's files is a no-op, anything else
is started clean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dsworker.checkpoint.fsutil import (
    disk_error,
    fsync_dir,
    safe_join,
    tmp_name,
    write_bytes_atomic,
)
from dsworker.checkpoint.sharded_metadata import ShardedMetadata, complete_token, read_sealed
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import (
    COMPLETE_MARKER,
    METADATA_FILE,
    PlanError,
    pod_dirs,
    pod_ranks,
)

log = logging.getLogger("dsworker.tools.stage")


class StageError(RuntimeError):
    """The store cannot be staged; the message names the file and the fix."""


@dataclass(frozen=True)
class StageResult:
    dirs: list[str]
    files: int
    bytes: int
    seconds: float
    skipped: bool

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


def pod_ordinal(explicit: int | None = None) -> int:
    """The StatefulSet ordinal: given, or the trailing number of the pod's hostname."""
    if explicit is not None:
        return explicit
    host = os.environ.get("POD_NAME") or socket.gethostname()
    m = re.search(r"-(\d+)$", host)
    if not m:
        raise StageError(f"cannot tell the pod ordinal from hostname {host!r}; pass --pod-ordinal")
    return int(m.group(1))


def _read_sealed_metadata(store: Path) -> tuple[bytes, ShardedMetadata]:
    """The store's metadata (bytes and parsed), refusing a store whose `_COMPLETE` does not seal it."""
    if not (store / COMPLETE_MARKER).exists():
        raise StageError(
            f"{store}: no {COMPLETE_MARKER} marker, the sharding Job has not finished (or failed); "
            "wait for the Sharded condition"
        )
    raw = read_sealed(store)
    if raw is None:
        raise StageError(
            f"{store / COMPLETE_MARKER}: does not seal {METADATA_FILE} (changed after sharding, or "
            "written by another tool); delete the directory and reshard"
        )
    try:
        md = ShardedMetadata.from_json(json.loads(raw), str(store / METADATA_FILE))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"{store / METADATA_FILE}: not valid JSON ({exc}); reshard") from None
    except CheckpointError as exc:
        raise StageError(str(exc)) from None
    return raw, md


@dataclass(frozen=True)
class _Job:
    rel: str
    src: Path
    dst: Path
    size: int


def plan_copy(
    store: Path, dest: Path, md: ShardedMetadata, ranks: range
) -> tuple[list[str], list[_Job]]:
    """The directories `ranks` read and the files to copy: exactly what the metadata lists.

    Each rank's directories must be the ones the plan's rank arithmetic gives (a crafted or
    damaged metadata file cannot name other paths), every name stays inside the store and `dest`,
    and every listed file must exist in the store with its recorded size.
    """
    where = store / METADATA_FILE
    try:
        plan = md.parallel_plan()
    except (PlanError, KeyError, TypeError) as exc:
        raise StageError(f"{where}: bad plan ({exc}); reshard") from None
    by_rank = {e.rank: e for e in md.ranks}
    missing = [r for r in ranks if r not in by_rank or not 0 <= r < plan.world_size]
    if missing:
        raise StageError(
            f"{where}: ranks {missing} are not in the layout "
            f"(world {plan.world_size}); check nodes*devicesPerNode against the sharded plan"
        )
    for r in ranks:
        got, want = by_rank[r].dirs, plan.rank_dirs(r)
        if got != want:
            raise StageError(
                f"{where}: rank {r} lists directories {got}, the plan's rank arithmetic gives "
                f"{want}; the metadata is damaged - delete the directory and reshard"
            )
    dirs = pod_dirs(plan, ranks)  # the rule the operator sizes the pod's memory by
    jobs: list[_Job] = []
    wanted = set(dirs)
    for rel, rec in md.files.items():
        top = rel.split("/", 1)[0]
        if "/" in rel and top not in wanted:
            continue  # another pod's directory
        try:
            src = safe_join(store, rel, f"{where} files")
            dst = safe_join(dest, rel, f"{where} files")
            size = int(rec["bytes"])
        except CheckpointError as exc:
            raise StageError(f"{exc}; delete the directory and reshard") from None
        except (KeyError, TypeError, ValueError):
            raise StageError(f"{where}: files[{rel!r}] has no byte size; reshard") from None
        if rel in (METADATA_FILE, COMPLETE_MARKER):
            continue  # written from the sealed bytes, then sealed, last
        try:
            have = src.stat().st_size if src.is_file() else None
        except OSError:
            have = None
        if have is None:
            raise StageError(
                f"{src}: listed in {METADATA_FILE} for ranks {list(ranks)} but missing; "
                "the store is damaged - delete the directory and reshard"
            )
        if have != size:
            raise StageError(
                f"{src}: {have} bytes but the metadata says {size}; the store is damaged, "
                "delete it and reshard"
            )
        jobs.append(_Job(rel, src, dst, size))
    jobs.sort(key=lambda j: j.rel)
    return dirs, jobs


def _already_staged(dest: Path, raw: bytes, jobs: list[_Job]) -> bool:
    """A sealed copy of the same metadata that holds every file of these ranks at its size."""
    if read_sealed(dest) != raw:
        return False
    try:
        return all(j.dst.stat().st_size == j.size for j in jobs)
    except OSError:
        return False


def _clear(dest: Path) -> None:
    """Empty `dest`, unsealing it first so a crash mid-wipe never leaves a sealed partial copy."""
    with contextlib.suppress(FileNotFoundError):
        (dest / COMPLETE_MARKER).unlink()
        fsync_dir(dest)
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _check_room(dest: Path, total: int) -> None:
    """Refuse before copying when `dest` cannot hold the ranks' files: a tmpfs that fills up
    half-way would only fail minutes later, with the pod's memory spent."""
    free = shutil.disk_usage(dest).free
    if total > free:
        raise StageError(
            f"{dest}: this pod's ranks need {total / 1e9:.2f} GB of shards and only "
            f"{free / 1e9:.2f} GB is free there; the staging emptyDir is memory: raise the "
            "worker pod's memory limit (or its node's memory), or spread the ranks over more pods"
        )


def stage_ranks(
    store: Path, dest: Path, ranks: range, workers: int = 4, log_every: float = 5.0
) -> StageResult:
    """Copy the files `ranks` need from `store` to `dest`, metadata then `_COMPLETE` last."""
    t0 = time.monotonic()
    store, dest = Path(store), Path(dest)
    raw, md = _read_sealed_metadata(store)
    dirs, jobs = plan_copy(store, dest, md, ranks)
    if _already_staged(dest, raw, jobs):
        return StageResult(dirs, 0, 0, time.monotonic() - t0, skipped=True)
    if dest.exists():
        _clear(dest)
    dest.mkdir(parents=True, exist_ok=True)
    total = sum(j.size for j in jobs)
    _check_room(dest, total)
    done = 0
    last = time.monotonic()

    def copy(job: _Job) -> int:
        job.dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(job.dst)
        try:
            with open(job.src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 8 << 20)
                fo.flush()
                os.fsync(fo.fileno())
                size = fo.tell()
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise disk_error(exc, job.dst) from exc
        if size != job.size:  # changed under us since the size check
            tmp.unlink()
            raise StageError(
                f"{job.src}: copied {size} bytes but the metadata says {job.size}; the store is "
                "damaged or being rewritten - reshard"
            )
        os.replace(tmp, job.dst)
        return size

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for n in pool.map(copy, jobs):
            done += n
            now = time.monotonic()
            if now - last >= log_every:
                last = now
                rate = done / max(now - t0, 1e-9)
                log.info(
                    "staged %.2f/%.2f GB (%.2f GB/s, ETA %.0fs)",
                    done / 1e9,
                    total / 1e9,
                    rate / 1e9,
                    (total - done) / max(rate, 1e-9),
                )
    for d in sorted({j.dst.parent for j in jobs}):
        fsync_dir(d)
    write_bytes_atomic(dest / METADATA_FILE, raw)
    write_bytes_atomic(dest / COMPLETE_MARKER, complete_token(raw).encode())
    return StageResult(dirs, len(jobs), done, time.monotonic() - t0, skipped=False)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stage", help="copy this pod's ranks from the shard store into tmpfs")
    p.add_argument("--store", required=True, type=Path, help="sharded directory (with _COMPLETE)")
    p.add_argument("--dest", required=True, type=Path, help="tmpfs directory to fill")
    p.add_argument("--devices-per-node", type=int, required=True, help="ranks per pod")
    p.add_argument("--pod-ordinal", type=int, default=None, help="default: from the hostname")
    p.add_argument("--workers", type=int, default=4, help="parallel file copies")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        i = pod_ordinal(args.pod_ordinal)
        d = args.devices_per_node
        res = stage_ranks(args.store, args.dest, pod_ranks(i, d), args.workers)
    except (StageError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "dirs": res.dirs,
        "files": res.files,
        "bytes": res.bytes,
        "seconds": round(res.seconds, 3),
        "gbps": round(res.gbps, 3),
        "skipped": res.skipped,
    }
    print(json.dumps(summary))
    return 0
