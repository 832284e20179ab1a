"""Writing a planned layout and sealing it: shards, config and side files, metadata, `_COMPLETE`.

Shared by shard, reshard and lora-merge. The seal comes last: model_sharded_metadata.json, then
`_COMPLETE` holding its sha256, so nothing partial is ever taken for a complete layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from dsworker import __version__
from dsworker.checkpoint.fsutil import (
    copy_file_atomic,
    fsync_dir,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)
from dsworker.checkpoint.planned_files import FileResult, OutFile
from dsworker.checkpoint.progress import summary
from dsworker.checkpoint.sharded_metadata import (
    RankEntry,
    ShardedMetadata,
    TensorEntry,
    complete_token,
    metadata_bytes,
    read_metadata,
)
from dsworker.checkpoint.writer_processes import run_jobs
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import (
    COMPLETE_MARKER,
    FORMAT,
    METADATA_FILE,
    ParallelPlan,
    dir_bytes_by_group,
)
from dsworker.contract.memory import fit_inputs
from dsworker.tools.layout_options import LayoutOptions
from dsworker.tools.layout_plan import only_ranks, plan_layout
from dsworker.tools.layout_source import LayoutSource
from dsworker.tools.output_dir import IN_PROGRESS_MARKER, check_space, output_lock, prepare_output


def fingerprint_of(src: LayoutSource, plan_d: dict[str, Any]) -> str:
    """sha256 over the format, the plan and the source's config and index."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "plan": plan_d}, sort_keys=True).encode())
    h.update(src.config_sha256.encode())
    h.update((src.index_sha256 or "").encode())
    h.update(src.fingerprint_salt.encode())
    return h.hexdigest()


def write_layout(
    src: LayoutSource,
    dst: str | Path,
    plan: ParallelPlan,
    options: LayoutOptions,
    what: str = "shard",
) -> dict[str, Any]:
    """Cut `src` into the layout of `plan` under `dst`; returns the summary record."""
    t0 = time.monotonic()
    dst = Path(dst)
    if options.dequantize_fp8 and src.quantization != "fp8":
        raise CheckpointError(
            f"{src.path}: --dequantize-fp8 given but the checkpoint is {src.quantization}, not FP8; "
            "drop --dequantize-fp8"
        )
    dequant = options.dequantize_fp8 and not src.dequantized
    dequantized = src.dequantized or options.dequantize_fp8
    plan_d = plan.record(mtp=options.mtp, quantization=src.quantization, dequantized=dequantized)
    fp = options.fingerprint or fingerprint_of(src, plan_d)
    layout = plan_layout(src, plan, options.mtp, dequant, options.max_file_bytes)
    if options.ranks is not None:
        layout = only_ranks(layout, plan, options.ranks)
        plan_d["ranks"] = [options.ranks.start, options.ranks.stop]
    jobs = [f for files in layout.values() for f in files if f.copy_of is None]
    with output_lock(dst):  # held until sealed: a second writer cannot wipe a live run
        if prepare_output(dst, fp, plan_d):
            md = read_metadata(dst)
            total = sum(int(v["bytes"]) for v in md.files.values())
            out = summary(total, len(md.files), time.monotonic() - t0, fingerprint=fp, skipped=True)
            out["outputDir"] = str(dst)
            out["dirBytes"] = _dir_bytes(dst, {k: int(v["bytes"]) for k, v in md.files.items()})
            return out | _model_report(src)
        write_json_atomic(
            dst / IN_PROGRESS_MARKER, {"format": FORMAT, "fingerprint": fp, "pid": os.getpid()}
        )
        cfg = _written_config(src.config, dequantized)
        if options.space_check:
            check_space(dst, jobs, [_size(p) for _, p in src.aux] + [len(cfg) + 64])
        for d in layout:
            (dst / d).mkdir(exist_ok=True)
        results = run_jobs(jobs, dst, options.processes, options.checksum, what)
        files: dict[str, dict[str, Any]] = {}
        for r in results:
            for rel in (r.relpath, *r.copies):
                files[rel] = _file_rec(r)
        write_bytes_atomic(dst / "config.json", cfg)
        files["config.json"] = _aux_rec(dst / "config.json", options.checksum)
        for name, path in src.aux:
            copy_file_atomic(path, dst / name)
            files[name] = _aux_rec(dst / name, options.checksum)
        md = _metadata(src, plan, plan_d, fp, layout, dict(sorted(files.items())), options.ranks)
        _seal(dst, metadata_bytes(md))
        written = sum(int(v["bytes"]) for v in files.values())
        out = summary(written, len(files), time.monotonic() - t0, fingerprint=fp, skipped=False)
        out["outputDir"] = str(dst)
        out["dirBytes"] = _dir_bytes(dst, {k: int(v["bytes"]) for k, v in files.items()})
        return out | _model_report(src)


def _model_report(src: LayoutSource) -> dict[str, Any]:
    """What the operator checks the memory fit with when no model-config annotation gives it:
    the real checkpoint's config.json (the keys the fit reads) and its weight format."""
    return {"modelConfig": fit_inputs(src.config), "quantization": src.quantization}


def _written_config(config: dict[str, Any], dequantized: bool) -> bytes:
    """config.json as the layout holds it: without quantization_config once dequantised."""
    cfg = dict(config)
    if dequantized:
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    return (json.dumps(cfg, indent=2) + "\n").encode()


def _seal(dst: Path, metadata: bytes) -> None:
    """The metadata file, then `_COMPLETE` holding its sha256: from here on the layout is whole."""
    write_bytes_atomic(dst / METADATA_FILE, metadata)
    with contextlib.suppress(FileNotFoundError):
        (dst / IN_PROGRESS_MARKER).unlink()
    write_bytes_atomic(dst / COMPLETE_MARKER, complete_token(metadata).encode())
    fsync_dir(dst)


def _dir_bytes(dst: Path, files: dict[str, int]) -> dict[str, int]:
    """The bytes per directory group (layout.dir_bytes_by_group), the metadata and the
    `_COMPLETE` marker counted with the top-level files: what a pod stages beside its ranks."""
    extra = {name: _size(dst / name) for name in (METADATA_FILE, COMPLETE_MARKER)}
    return dir_bytes_by_group({**files, **extra})


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _file_rec(r: FileResult) -> dict[str, Any]:
    rec: dict[str, Any] = {"bytes": r.bytes}
    if r.sha256:
        rec["sha256"] = r.sha256
    return rec


def _aux_rec(path: Path, checksum: bool) -> dict[str, Any]:
    rec: dict[str, Any] = {"bytes": path.stat().st_size}
    if checksum:
        rec["sha256"] = sha256_file(path)
    return rec


def _metadata(
    src: LayoutSource,
    plan: ParallelPlan,
    plan_d: dict[str, Any],
    fp: str,
    layout: dict[str, list[OutFile]],
    files: dict[str, dict[str, Any]],
    only: range | None = None,
) -> ShardedMetadata:
    tensors = [
        TensorEntry(
            name=e.name,
            file=f.relpath,
            dtype=e.dtype,
            shape=e.shape,
            global_shape=e.global_shape,
            dim=e.dim,
            part=e.part,
            parts=e.parts,
            source_file=e.source_file,
            global_value=e.global_value,
        )
        for f, e in sorted(
            ((f, e) for fl in layout.values() for f in fl for e in f.entries),
            key=lambda fe: fe[1].order,
        )
    ]
    ranks = []
    for r in only if only is not None else range(plan.world_size):
        c = plan.coords(r)
        dirs = plan.rank_dirs(r)
        rfiles = [f.relpath for d in dirs for f in layout.get(d, [])]
        ranks.append(
            RankEntry(
                rank=r,
                dp_rank=c.dp_rank,
                tp_rank=c.tp_rank,
                moe_ep_rank=c.moe_ep_rank,
                moe_tp_rank=c.moe_tp_rank,
                dirs=dirs,
                files=rfiles,
                bytes=sum(int(files[f]["bytes"]) for f in rfiles),
            )
        )
    dims = src.dims
    return ShardedMetadata(
        format=FORMAT,
        fingerprint=fp,
        plan=plan_d,
        source={
            "path": str(src.path),
            "configSha256": src.config_sha256,
            "indexSha256": src.index_sha256,
            **({"fingerprintSalt": src.fingerprint_salt} if src.fingerprint_salt else {}),
        },
        ranks=ranks,
        files=files,
        tensors=tensors,
        model={
            "architecture": dims.architecture,
            "numHiddenLayers": dims.num_hidden_layers,
            "numNextnPredictLayers": dims.num_nextn_predict_layers,
            "nRoutedExperts": dims.n_routed_experts,
            "fp8Block": list(dims.fp8_block) if dims.fp8_block else None,
        },
        created_by=f"dsworker {__version__}",
    )
