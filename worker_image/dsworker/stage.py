"""`dsworker stage`: copy one pod's ranks from the shard store into tmpfs before the engine starts.

The worker pod's init container runs this: only the directories its own ranks read (plus the small
top-level JSON files) are copied, so host memory holds ~1/nodes of the checkpoint. The destination
is complete only when `_COMPLETE` exists; a rerun over a complete copy of the same fingerprint is a
no-op, anything else is started clean.
"""

from __future__ import annotations

import argparse
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

from dsworker.layout import COMPLETE_MARKER, METADATA_FILE

log = logging.getLogger("dsworker.stage")


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


def _read_metadata(store: Path) -> dict:
    if not (store / COMPLETE_MARKER).exists():
        raise StageError(
            f"{store}: no {COMPLETE_MARKER} marker, the sharding Job has not finished (or failed); "
            "wait for the Sharded condition"
        )
    try:
        return json.loads((store / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(
            f"{store / METADATA_FILE}: unreadable ({exc}); reshard the model"
        ) from None


def stage_ranks(
    store: Path, dest: Path, ranks: range, workers: int = 4, log_every: float = 5.0
) -> StageResult:
    """Copy the directories `ranks` need from `store` to `dest`, marker last."""
    t0 = time.monotonic()
    meta = _read_metadata(store)
    fingerprint = str(meta.get("fingerprint", ""))
    marker = dest / COMPLETE_MARKER
    by_rank = {int(r["rank"]): r for r in meta.get("ranks", [])}
    missing = [r for r in ranks if r not in by_rank]
    if missing:
        raise StageError(
            f"{store / METADATA_FILE}: ranks {missing} are not in the layout "
            f"(world {len(by_rank)}); check nodes*devicesPerNode against the sharded plan"
        )
    dirs: list[str] = []
    for r in ranks:
        for d in by_rank[r]["dirs"]:
            if d not in dirs:
                dirs.append(d)
    if marker.exists() and marker.read_text().strip() == fingerprint:
        return StageResult(dirs, 0, 0, time.monotonic() - t0, skipped=True)
    if dest.exists():
        for child in dest.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    dest.mkdir(parents=True, exist_ok=True)

    files_meta: dict[str, dict] = meta.get("files", {})
    jobs: list[tuple[Path, Path, int | None]] = []
    for top in sorted(store.iterdir()):
        if top.is_file() and top.name != COMPLETE_MARKER and top.suffix == ".json":
            jobs.append((top, dest / top.name, None))
    for d in dirs:
        src_dir = store / d
        if not src_dir.is_dir():
            raise StageError(f"{src_dir}: listed for ranks {list(ranks)} but missing; reshard")
        for f in sorted(src_dir.iterdir()):
            rel = f"{d}/{f.name}"
            if f.suffix != ".safetensors":
                continue
            expected = files_meta.get(rel, {}).get("bytes")
            jobs.append((f, dest / d / f.name, expected))
    total = sum(src.stat().st_size for src, _, _ in jobs)
    done = 0
    last = time.monotonic()

    def copy(job: tuple[Path, Path, int | None]) -> int:
        src, dst, expected = job
        dst.parent.mkdir(parents=True, exist_ok=True)
        size = src.stat().st_size
        if expected is not None and size != expected:
            raise StageError(
                f"{src}: {size} bytes but the metadata says {expected}; the store is damaged, "
                "delete it and reshard"
            )
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
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
    os.sync()
    marker.write_text(fingerprint + "\n")
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
        res = stage_ranks(args.store, args.dest, range(i * d, (i + 1) * d), args.workers)
    except StageError as exc:
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
