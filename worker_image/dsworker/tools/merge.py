"""`dsworker merge SRC DST`: a sharded layout back into a full HuggingFace checkpoint.

The inverse of `shard`: each tensor is reassembled from its stored slices (dim-0 slices by in-kernel
copies, dim-1 slices row chunk by row chunk) into the file it came from, so the result equals the
source tensor for tensor and byte for byte unless the shards were dequantised (then the weights are
the BF16 dequantisation and the scales are gone). W8A16 weight_shape gets its global value back.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from dsworker.checkpoint.fsutil import copy_file_atomic, write_json_atomic
from dsworker.checkpoint.planned_files import OutEntry, OutFile
from dsworker.checkpoint.progress import emit_summary, summary
from dsworker.checkpoint.regions import GlobalTensor, region
from dsworker.checkpoint.writer_processes import run_jobs
from dsworker.contract.errors import CheckpointError
from dsworker.tools.sharded_source import open_sharded

INDEX_FILE = "model.safetensors.index.json"


def _entry(gt: GlobalTensor) -> OutEntry:
    e = OutEntry(name=gt.name, dtype=gt.dtype, shape=gt.shape, region=None, global_shape=gt.shape)
    if gt.value is not None and gt.name.endswith(".weight_shape"):
        size = 8 if gt.dtype == "I64" else 4
        e.const = b"".join(int(v).to_bytes(size, "little", signed=True) for v in gt.value)
    else:
        e.region = region(gt, None)
    return e


def plan_merge(tensors: dict[str, GlobalTensor], max_file_bytes: int = 4 << 30) -> list[OutFile]:
    """Tensors back into their source files (or size-bounded files when the source is unknown)."""
    ordered = sorted(tensors.values(), key=lambda t: t.order)
    files: dict[str, OutFile] = {}
    loose: list[GlobalTensor] = []
    for gt in ordered:
        if gt.source_file:
            files.setdefault(gt.source_file, OutFile(gt.source_file)).entries.append(_entry(gt))
        else:
            loose.append(gt)
    if loose:
        chunks: list[list[GlobalTensor]] = [[]]
        size = 0
        for gt in loose:
            if chunks[-1] and size + gt.nbytes > max_file_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(gt)
            size += gt.nbytes
        n = len(chunks)
        for k, c in enumerate(chunks):
            name = f"model-merged-{k + 1:05d}-of-{n:05d}.safetensors"
            files[name] = OutFile(name, [_entry(g) for g in c])
    return list(files.values())


def merge(
    src_dir: str | Path, dst_dir: str | Path, processes: int = 1, max_file_bytes: int = 4 << 30
) -> dict[str, Any]:
    """Merge the layout in src_dir into a HF checkpoint in dst_dir (which must be empty or new)."""
    t0 = time.monotonic()
    md, src = open_sharded(src_dir)
    dst = Path(dst_dir)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(
            f"{dst}: exists and is not an empty directory; choose a new output directory"
        )
    dst.mkdir(parents=True, exist_ok=True)
    jobs = plan_merge(src.tensors, max_file_bytes)
    results = run_jobs(jobs, dst, processes, False, "merge")
    weight_map = {e.name: j.relpath for j in jobs for e in j.entries}
    total_size = sum(e.nbytes for j in jobs for e in j.entries)
    nbytes = sum(r.bytes for r in results)
    if md.source.get("indexSha256") is not None or len(jobs) > 1:
        write_json_atomic(
            dst / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        )
    copy_file_atomic(Path(src_dir) / "config.json", dst / "config.json")
    for name, path in src.aux:
        copy_file_atomic(path, dst / name)
    out = summary(
        nbytes, len(results), time.monotonic() - t0, outputDir=str(dst), tensors=len(weight_map)
    )
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a sharded layout back into a full HF checkpoint",
        description="Merge a dsop-sharded/1 layout back into a full HuggingFace checkpoint.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--processes", type=int, default=1)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    emit_summary(merge(args.src, args.dst, args.processes))
    return 0


__all__ = ["merge", "plan_merge"]
