"""`dsworker verify DIR`: is this sharded layout (or HF checkpoint) whole and self-consistent?

Used by the sharder before it trusts an existing output, by the stager before it copies, and by
people. For a sharded layout: metadata parses, `_COMPLETE` seals it, the files on disk are exactly
the ones listed (sizes, checksums when recorded), every safetensors header parses and holds exactly
the tensors the metadata places there, and the rank table follows the rank arithmetic. For a HF
checkpoint: the index, the files and config.json agree (see checkpoint.hf_checkpoint). Links and
special files (FIFOs, devices) are refused, never followed or opened.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

from dsworker.checkpoint.fsutil import safe_join, sha256_file
from dsworker.checkpoint.hf_checkpoint import open_checkpoint
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.checkpoint.sharded_metadata import ShardedMetadata, is_complete, read_metadata
from dsworker.contract.errors import EXIT_BAD_INPUT, CheckpointError, PlanError
from dsworker.contract.layout import COMPLETE_MARKER, METADATA_FILE

IGNORED = {METADATA_FILE, COMPLETE_MARKER}


def _disk_files(root: Path) -> tuple[set[str], list[str]]:
    """The layout's files on disk, and a problem for each one that is not a plain file.

    The sharder writes regular files and directories only: a symbolic link (it could point at
    /proc/self/environ or another tenant's data) or a FIFO, socket or device (reading it would
    hang or never end) is refused and never opened.
    """
    out: set[str] = set()
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in [*dirnames, *filenames]:
            p = name if rel == "." else f"{rel}/{name}"
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{root / p}: is a symbolic link; a layout holds none - delete it")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                problems.append(f"{root / p}: is not a regular file (a FIFO, socket or device)")
            elif stat.S_ISREG(mode) and p not in IGNORED:
                out.add(p)
        dirnames[:] = [
            d
            for d in dirnames
            if d != "lost+found" and not os.path.islink(os.path.join(dirpath, d))
        ]
    return out, problems


def verify_sharded(root: str | Path, checksums: bool = True) -> list[str]:
    """Problems found in a sharded layout (empty list: it is good)."""
    root = Path(root)
    try:
        md = read_metadata(root)
    except CheckpointError as e:
        return [str(e)]
    problems: list[str] = []
    if not (root / COMPLETE_MARKER).exists():
        problems.append(
            f"{root}: no {COMPLETE_MARKER}: the layout is incomplete; re-run dsworker shard"
        )
    elif not is_complete(root):
        problems.append(
            f"{root / COMPLETE_MARKER}: does not match {METADATA_FILE}; re-run dsworker shard"
        )
    listed = set()
    for rel in md.files:
        try:
            safe_join(root, rel, f"{METADATA_FILE} files")
        except CheckpointError as e:
            problems.append(str(e))
            continue
        listed.add(rel)
    on_disk, odd = _disk_files(root)
    problems += odd
    for rel in sorted(on_disk - listed):
        problems.append(f"{root / rel}: on disk but not listed in {METADATA_FILE}")
    for rel in sorted(listed - on_disk):
        if not any(p.startswith(f"{root / rel}: ") for p in odd):
            problems.append(f"{root / rel}: listed in {METADATA_FILE} but missing")
    problems += _check_files(root, md, listed, on_disk, checksums)
    return problems + _check_ranks(md)


def _check_files(
    root: Path, md: ShardedMetadata, listed: set[str], on_disk: set[str], checksums: bool
) -> list[str]:
    """Sizes, checksums and safetensors headers of the listed files against the metadata."""
    problems: list[str] = []
    by_file: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for t in md.tensors:
        by_file.setdefault(t.file, {})[t.name] = (t.dtype, t.shape)
        if t.file not in listed:
            problems.append(
                f"{METADATA_FILE}: tensor {t.name} is in {t.file}, which is not a listed file"
            )
    for rel in sorted(listed & on_disk):
        path = root / rel
        rec = md.files[rel]
        size = path.stat().st_size
        if size != int(rec.get("bytes", -1)):
            problems.append(f"{path}: {size} bytes, metadata says {rec.get('bytes')}")
            continue
        if checksums and rec.get("sha256") and sha256_file(path) != rec["sha256"]:
            problems.append(f"{path}: sha256 differs from the metadata (corrupt copy?)")
        if rel.endswith(".safetensors"):
            try:
                with SafetensorsReader(path) as r:
                    have = {n: (t.dtype, t.shape) for n, t in r.tensors.items()}
            except CheckpointError as e:
                problems.append(str(e))
                continue
            want = by_file.get(rel, {})
            for n in sorted(set(want) - set(have)):
                problems.append(f"{path}: tensor {n} listed in the metadata is missing")
            for n in sorted(set(have) - set(want)):
                problems.append(f"{path}: tensor {n} is not listed in the metadata")
            for n in sorted(set(have) & set(want)):
                if have[n] != want[n]:
                    problems.append(f"{path}: tensor {n} is {have[n]}, metadata says {want[n]}")
    return problems


def _check_ranks(md: ShardedMetadata) -> list[str]:
    """The rank table against the plan's rank arithmetic."""
    try:
        plan = md.parallel_plan()
    except (PlanError, KeyError, TypeError) as e:
        return [f"{METADATA_FILE}: bad plan ({e})"]
    problems: list[str] = []
    # A node's part of a node-local store (dsworker shard --node-index) lists its ranks only.
    part = md.plan.get("ranks")
    want = range(*part) if isinstance(part, list) and len(part) == 2 else range(plan.world_size)
    if [e.rank for e in md.ranks] != list(want):
        problems.append(
            f"{METADATA_FILE}: {len(md.ranks)} rank entries for ranks {want.start}.."
            f"{want.stop - 1} of world size {plan.world_size}"
        )
    for e in md.ranks:
        if not 0 <= e.rank < plan.world_size:
            problems.append(f"{METADATA_FILE}: rank {e.rank} outside the world")
            continue
        c = plan.coords(e.rank)
        got = (e.dp_rank, e.tp_rank, e.moe_ep_rank, e.moe_tp_rank)
        if got != (c.dp_rank, c.tp_rank, c.moe_ep_rank, c.moe_tp_rank) or e.dirs != plan.rank_dirs(
            e.rank
        ):
            problems.append(
                f"{METADATA_FILE}: rank {e.rank}'s coordinates/dirs break the rank arithmetic"
            )
    return problems


def verify_hf(root: str | Path) -> list[str]:
    """Problems found in a HF checkpoint (index vs files vs headers vs config.json)."""
    try:
        open_checkpoint(root)
    except CheckpointError as e:
        return [str(e)]
    return []


def verify(root: str | Path) -> tuple[str, list[str]]:
    """('sharded' | 'hf' | 'unknown', problems) for a directory."""
    root = Path(root)
    if not root.is_dir():
        return "unknown", [f"{root}: not a directory"]
    if (root / METADATA_FILE).exists():
        return "sharded", verify_sharded(root)
    if (root / "config.json").exists():
        return "hf", verify_hf(root)
    return "unknown", [
        f"{root}: neither a sharded layout ({METADATA_FILE}) nor a HF checkpoint (config.json)"
    ]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check a sharded layout or a HF checkpoint",
        description="Check a sharded layout or a HuggingFace checkpoint; exit 2 with messages if broken.",
    )
    p.add_argument("dir")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    kind, problems = verify(args.dir)
    for msg in problems:
        print(f"dsworker verify: {msg}", file=sys.stderr)
    print(
        json.dumps(
            {"dir": str(args.dir), "kind": kind, "ok": not problems, "problems": len(problems)}
        )
    )
    return EXIT_BAD_INPUT if problems else 0
