"""`dsworker stage-checkpoint`: copy a HuggingFace checkpoint's safetensors and JSON files into a
node-local (memory-backed) directory before an engine that loads whole checkpoints (vLLM) starts.

Only regular top-level *.safetensors and *.json files are copied (a symlink only when it stays
inside the checkpoint directory): no pickle, no code. The index's weight_map must name only files
that are copied. The copy is sealed with `_COMPLETE` (sha256 of the sorted name:size list), last;
a rerun over a sealed copy of the same files is a no-op, anything else is started clean.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dsworker.checkpoint.fsutil import copy_file_atomic, fsync_dir, load_json, write_bytes_atomic
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import COMPLETE_MARKER

SUFFIXES = (".safetensors", ".json")
INDEX = "model.safetensors.index.json"


def checkpoint_files(source: Path) -> dict[str, int]:
    """name -> size of the files to copy; raises CheckpointError naming what is wrong."""
    root = source.resolve()
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{source}: no config.json; point the model source at a checkpoint")
    files: dict[str, int] = {}
    for entry in sorted(source.iterdir()):
        if not entry.name.endswith(SUFFIXES) or entry.name.startswith("."):
            continue
        target = entry.resolve()
        if entry.is_symlink() and root not in target.parents:
            raise CheckpointError(
                f"{entry}: a symlink out of the checkpoint directory ({target}); copy the file in"
            )
        if target.is_file():
            files[entry.name] = target.stat().st_size
    index = load_json(source / INDEX, INDEX) if INDEX in files else None
    if index is not None:
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{source / INDEX}: no weight_map object; fix the index")
        missing = sorted({str(f) for f in weight_map.values()} - set(files))
        if missing:
            raise CheckpointError(
                f"{source / INDEX}: weight_map names {missing[:3]} which are not top-level "
                "safetensors files of the checkpoint; fix the index or the checkpoint"
            )
    if not any(name.endswith(".safetensors") for name in files):
        raise CheckpointError(f"{source}: no *.safetensors files; only safetensors are loaded")
    return files


def seal(files: dict[str, int]) -> str:
    listing = "\n".join(f"{name}:{size}" for name, size in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def stage_checkpoint(source: Path, dest: Path, workers: int = 4) -> dict[str, object]:
    """Copy the checkpoint's files to `dest`, `_COMPLETE` last; returns a summary."""
    t0 = time.monotonic()
    files = checkpoint_files(source)
    token = seal(files)
    marker = dest / COMPLETE_MARKER
    if marker.is_file() and marker.read_text().strip() == token:
        return {"files": 0, "bytes": 0, "seconds": 0.0, "skipped": True}
    dest.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for child in dest.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    total = sum(files.values())
    free = shutil.disk_usage(dest).free
    if total > free:
        raise CheckpointError(
            f"{dest}: the checkpoint needs {total / 1e9:.2f} GB and only {free / 1e9:.2f} GB is "
            "free; the staging emptyDir is memory: raise the worker pod's memory limit"
        )
    with ThreadPoolExecutor(max_workers=workers) as pool:
        copied = list(pool.map(lambda n: copy_file_atomic(source / n, dest / n), sorted(files)))
    if copied != [files[n] for n in sorted(files)]:
        raise CheckpointError(f"{source}: files changed while being copied; stage again")
    fsync_dir(dest)
    write_bytes_atomic(marker, token.encode())
    seconds = time.monotonic() - t0
    return {"files": len(files), "bytes": total, "seconds": round(seconds, 3), "skipped": False}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stage-checkpoint", help="copy a HF checkpoint's safetensors and JSON files into tmpfs"
    )
    p.add_argument("--source", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--dest", required=True, type=Path, help="tmpfs directory to fill")
    p.add_argument("--workers", type=int, default=4, help="parallel file copies")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        summary = stage_checkpoint(args.source, args.dest, args.workers)
    except (CheckpointError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


__all__ = ["checkpoint_files", "stage_checkpoint"]
