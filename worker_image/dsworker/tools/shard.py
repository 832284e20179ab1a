"""`dsworker shard`: a HF DeepSeek checkpoint -> the per-rank layout of one parallel plan.

Why offline: each rank then reads only its own slices, contiguously, from tmpfs (see
SHARDED_FORMAT.md). The split rules come from layout.py; this module plans the output files
(`plan_layout`), manages the output directory so that re-runs are safe (`prepare_output`), writes
files through jobs.py, and seals the result with model_sharded_metadata.json and `_COMPLETE`.
reshard.py reuses `write_layout` with a sharded layout as the source.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsworker import __version__
from dsworker.checkpoint.fsutil import (
    copy_file_atomic,
    disk_error,
    fsync_dir,
    write_bytes_atomic,
    write_json_atomic,
)
from dsworker.checkpoint.hf_checkpoint import open_checkpoint
from dsworker.checkpoint.progress import emit_summary, summary, write_termination_log
from dsworker.checkpoint.regions import GlobalTensor, region
from dsworker.checkpoint.sharded_metadata import (
    RankEntry,
    ShardedMetadata,
    TensorEntry,
    complete_token,
    is_complete,
    metadata_bytes,
    plan_dict,
    plan_mismatch,
    read_metadata,
)
from dsworker.checkpoint.writers import FileResult, OutEntry, OutFile, run_jobs
from dsworker.contract.errors import CheckpointError, OutputBusyError
from dsworker.contract.layout import (
    COMPLETE_MARKER,
    FORMAT,
    METADATA_FILE,
    MOE,
    ModelDims,
    ParallelPlan,
    PlanError,
    check_plan,
    dir_bytes_by_group,
    is_mtp,
    local_shape,
    owner_dirs,
    parts_for,
    place,
    pod_dirs,
    pod_ranks,
    split_name,
    tensor_slice,
)

IN_PROGRESS_MARKER = ".dsop-sharding"
LOCK_SUFFIX = ".dsop-lock"
DEFAULT_MAX_FILE_BYTES = 4 << 30
IGNORABLE = {"lost+found"}


@dataclass
class LayoutSource:
    """What a layout is cut from: tensors, config, and files to copy alongside (HF or sharded)."""

    path: Path
    tensors: dict[str, GlobalTensor]
    dims: ModelDims
    config: dict[str, Any]
    config_sha256: str
    index_sha256: str | None
    quantization: str
    dequantized: bool = False
    aux: list[tuple[str, Path]] = field(default_factory=list)  # (name, file) besides config.json
    # LoRA to fold in while cutting: weight name -> (lora_A, lora_B, scale); see lora.py
    lora: dict[str, tuple[GlobalTensor, GlobalTensor, float]] = field(default_factory=dict)
    fingerprint_salt: str = ""  # distinguishes e.g. base+adapter from the base alone

    @property
    def has_mtp(self) -> bool:
        return any(is_mtp(n, self.dims) for n in self.tensors)


def hf_source(model_path: str | Path) -> LayoutSource:
    ck = open_checkpoint(model_path)
    return LayoutSource(
        path=ck.root,
        tensors=ck.tensors,
        dims=ck.dims,
        config=ck.config,
        config_sha256=ck.config_sha256,
        index_sha256=ck.index_sha256,
        quantization=ck.quantization,
        aux=[(n, ck.root / n) for n in ck.aux_files if n != "config.json"],
    )


@dataclass(frozen=True)
class Expected:
    """What the caller asked of the checkpoint (a DeepSeekDeployment's spec.model and
    spec.serving, passed by the operator, which never reads config.json itself)."""

    architecture: str | None = None
    quantization: str | None = None  # None or "auto": whatever the checkpoint is
    max_seq_len: int | None = None


def check_expected(src: LayoutSource, want: Expected) -> None:
    """Refuse (CheckpointError, exit 2) a checkpoint that is not what was asked, before any
    output: each problem names the flag and the deployment field to fix."""
    errs: list[str] = []
    arch = src.dims.architecture
    if want.architecture and arch != want.architecture:
        errs.append(
            f"config.json describes {arch}, not {want.architecture} (--expect-architecture); "
            "a DeepSeekDeployment shards only DeepseekV3 (V3, R1) offline: for V2 set "
            "spec.sharding.enabled: false, else point spec.model.source at a V3 checkpoint"
        )
    if want.quantization not in (None, "auto", src.quantization):
        errs.append(
            f"the checkpoint is {src.quantization}, not {want.quantization} "
            f"(--expect-quantization); set spec.model.quantization: auto or {src.quantization}"
        )
    most = src.config.get("max_position_embeddings")
    if want.max_seq_len and isinstance(most, int) and want.max_seq_len > most:
        errs.append(
            f"--max-seq-len {want.max_seq_len} exceeds config.json max_position_embeddings "
            f"({most}); lower spec.serving.maxSeqLen"
        )
    if errs:
        raise CheckpointError(f"{src.path}: " + "; ".join(errs))


def _fp8_weights(tensors: dict[str, GlobalTensor]) -> set[str]:
    return {
        n
        for n, t in tensors.items()
        if t.dtype == "F8_E4M3" and f"{split_name(n)[0]}.weight_scale_inv" in tensors
    }


def plan_layout(
    src: LayoutSource,
    plan: ParallelPlan,
    mtp: bool,
    dequant: bool,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> dict[str, list[OutFile]]:
    """Directory -> planned files, every tensor slice placed by layout.py's rules."""
    dims = src.dims
    errs = check_plan(dims, plan)
    if dequant:
        errs = [e for e in errs if not e.startswith("FP8 block quantisation")]
    if errs:
        first = _first_bad_tensor(src, plan)
        raise PlanError(
            "the plan does not divide the model: "
            + "; ".join(errs)
            + (f" (first: {first})" if first else "")
        )
    if mtp and not src.has_mtp:
        raise CheckpointError(
            f"{src.path}: --mtp given but the checkpoint has no MTP layer (no tensors under "
            f"model.layers.{dims.num_hidden_layers}.); drop --mtp or use a checkpoint with MTP weights"
        )
    fp8 = _fp8_weights(src.tensors)
    scales_of_fp8 = {f"{split_name(n)[0]}.weight_scale_inv" for n in fp8}
    lora_fp8 = {n for n in src.lora if n in fp8}
    drop = (scales_of_fp8 if dequant else set()) | {
        f"{split_name(n)[0]}.weight_scale_inv" for n in lora_fp8
    }
    block = dims.fp8_block or (128, 128)
    dirs: dict[str, list[OutEntry]] = {d: [] for d in plan.all_dirs()}
    for gt in sorted(src.tensors.values(), key=lambda t: t.order):
        name = gt.name
        if not mtp and is_mtp(name, dims):
            continue
        if name in drop:
            continue
        pl = place(name, dims)
        parts = parts_for(pl.group, plan)
        if pl.group == MOE and pl.expert is not None and pl.expert >= dims.n_routed_experts:
            raise CheckpointError(f"tensor {name}: expert {pl.expert} >= n_routed_experts")
        for d, part in owner_dirs(pl, dims, plan):
            sl = tensor_slice(name, gt.shape, pl, part, parts)
            shape = local_shape(gt.shape, sl)
            e = OutEntry(
                name=name,
                dtype=gt.dtype,
                shape=shape,
                region=region(gt, sl.dim, sl.start, sl.stop),
                global_shape=gt.shape,
                dim=sl.dim,
                part=part if sl.dim is not None else 0,
                parts=parts if sl.dim is not None else 1,
                source_file=gt.source_file,
                order=gt.order,
            )
            if name in src.lora:
                a, b, s = src.lora[name]
                e.lora = (region(a, None), region(b, None), s)
                if name in fp8:
                    scale = src.tensors[f"{split_name(name)[0]}.weight_scale_inv"]
                    e.dtype, e.block, e.scale = "BF16", block, region(scale, None)
            elif name in fp8:
                if dequant:
                    scale = src.tensors[f"{split_name(name)[0]}.weight_scale_inv"]
                    e.dtype, e.transform, e.block = "BF16", "dequant_fp8", block
                    e.scale = region(scale, None)
                elif sl.dim is not None and (sl.stop - sl.start) % block[sl.dim]:
                    raise PlanError(
                        f"FP8 tensor {name}: a shard of dim {sl.dim} would be "
                        f"{sl.stop - sl.start} wide, not a multiple of the {block[sl.dim]} "
                        "quantisation block; use a smaller tp/moeTp or --dequantize-fp8"
                    )
            if name.endswith(".weight_shape") and gt.value is not None:
                e.global_value = list(gt.value)
                local = list(gt.value)
                if pl.dim is not None and parts > 1 and pl.dim < len(local):
                    if local[pl.dim] % parts:
                        raise PlanError(
                            f"tensor {name}: dim {pl.dim} of size {local[pl.dim]} does not divide "
                            f"into {parts} parts; choose a tp/moeTp that divides it"
                        )
                    local[pl.dim] //= parts
                e.const = b"".join(
                    int(v).to_bytes(8 if gt.dtype == "I64" else 4, "little", signed=True)
                    for v in local
                )
                e.region = None
            dirs[d].append(e)
    layout = {d: _split_files(d, entries, max_file_bytes) for d, entries in dirs.items()}
    _link_identical(layout)
    return layout


def _link_identical(layout: dict[str, list[OutFile]]) -> None:
    """With dp > 1 every dp replica's model-{r} holds the same vocab slices: write each distinct
    file once and give the others hard links (same bytes on disk, no extra I/O or space)."""
    first: dict[tuple, OutFile] = {}
    for files in layout.values():
        for f in files:
            key = (f.relpath.rsplit("/", 1)[-1], f.signature())
            orig = first.setdefault(key, f)
            if orig is not f:
                f.copy_of = orig.relpath
                orig.copies.append(f.relpath)


def _first_bad_tensor(src: LayoutSource, plan: ParallelPlan) -> str | None:
    """The first tensor whose split fails, for an error message that names a tensor and a dim."""
    for gt in sorted(src.tensors.values(), key=lambda t: t.order):
        pl = place(gt.name, src.dims)
        parts = parts_for(pl.group, plan)
        try:
            tensor_slice(gt.name, gt.shape, pl, 0, parts)
        except PlanError as e:
            return str(e)
        if (
            gt.dtype == "F8_E4M3"
            and pl.dim is not None
            and parts > 1
            and len(gt.shape) > pl.dim
            and (gt.shape[pl.dim] // parts) % (src.dims.fp8_block or (128, 128))[pl.dim]
        ):
            return f"FP8 tensor {gt.name}: dim {pl.dim} shard {gt.shape[pl.dim] // parts} is not a multiple of 128"
    return None


def _split_files(d: str, entries: list[OutEntry], max_bytes: int) -> list[OutFile]:
    """Pack a directory's tensors into files of at most max_bytes, never splitting a module."""
    if not entries:
        return []
    groups: list[list[OutEntry]] = []
    for e in entries:
        mod = split_name(e.name)[0]
        if groups and split_name(groups[-1][-1].name)[0] == mod:
            groups[-1].append(e)
        else:
            groups.append([e])
    files: list[list[OutEntry]] = [[]]
    size = 0
    for g in groups:
        gb = sum(e.nbytes for e in g)
        if files[-1] and size + gb > max_bytes:
            files.append([])
            size = 0
        files[-1].extend(g)
        size += gb
    if len(files) == 1:
        return [OutFile(f"{d}/model.safetensors", files[0])]
    n = len(files)
    return [
        OutFile(f"{d}/model-{k + 1:05d}-of-{n:05d}.safetensors", f) for k, f in enumerate(files)
    ]


def fingerprint_of(src: LayoutSource, plan_d: dict[str, Any]) -> str:
    """sha256 over the format, the plan and the source's config and index."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "plan": plan_d}, sort_keys=True).encode())
    h.update(src.config_sha256.encode())
    h.update((src.index_sha256 or "").encode())
    h.update(src.fingerprint_salt.encode())
    return h.hexdigest()


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
    from dsworker.tools.verify import verify_sharded

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


def _check_space(dst: Path, jobs: list[OutFile], aux_bytes: Sequence[int] = ()) -> None:
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
            "enlarge the shard store or remove old shards"
        )


def write_layout(
    src: LayoutSource,
    dst: str | Path,
    plan: ParallelPlan,
    *,
    mtp: bool = False,
    dequantize_fp8: bool = False,
    processes: int = 1,
    checksum: bool = False,
    fingerprint: str | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    space_check: bool = True,
    what: str = "shard",
    ranks: range | None = None,
) -> dict[str, Any]:
    """Cut `src` into the layout of `plan` under `dst`; returns the summary record.

    `ranks`: write only the directories these ranks read plus the top-level files (one node's
    part of a node-local store); the metadata then lists only those ranks and files."""
    t0 = time.monotonic()
    dst = Path(dst)
    if dequantize_fp8 and src.quantization != "fp8":
        raise CheckpointError(
            f"{src.path}: --dequantize-fp8 given but the checkpoint is {src.quantization}, not FP8; "
            "drop --dequantize-fp8"
        )
    dequant = dequantize_fp8 and not src.dequantized
    dequantized = src.dequantized or dequantize_fp8
    plan_d = plan_dict(plan, mtp, src.quantization, dequantized)
    fp = fingerprint or fingerprint_of(src, plan_d)
    layout = plan_layout(src, plan, mtp, dequant, max_file_bytes)
    if ranks is not None:
        layout = _only_ranks(layout, plan, ranks)
        plan_d["ranks"] = [ranks.start, ranks.stop]
    jobs = [f for files in layout.values() for f in files if f.copy_of is None]
    with output_lock(dst):  # held until sealed: a second writer cannot wipe a live run
        if prepare_output(dst, fp, plan_d):
            md = read_metadata(dst)
            total = sum(int(v["bytes"]) for v in md.files.values())
            out = summary(total, len(md.files), time.monotonic() - t0, fingerprint=fp, skipped=True)
            out["outputDir"] = str(dst)
            out["dirBytes"] = _dir_bytes(dst, {k: int(v["bytes"]) for k, v in md.files.items()})
            return out
        write_json_atomic(
            dst / IN_PROGRESS_MARKER, {"format": FORMAT, "fingerprint": fp, "pid": os.getpid()}
        )
        if space_check:
            _check_space(
                dst,
                jobs,
                [_size(p) for _, p in src.aux] + [len(json.dumps(src.config, indent=2)) + 64],
            )
        for d in layout:
            (dst / d).mkdir(exist_ok=True)
        results = run_jobs(jobs, dst, processes, checksum, what)
        files: dict[str, dict[str, Any]] = {}
        for r in results:
            for rel in (r.relpath, *r.copies):
                files[rel] = _file_rec(r)
        cfg = dict(src.config)
        if dequantized:
            cfg.pop("quantization_config", None)
            cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
        cfg_bytes = (json.dumps(cfg, indent=2) + "\n").encode()
        write_bytes_atomic(dst / "config.json", cfg_bytes)
        files["config.json"] = _aux_rec(dst / "config.json", checksum)
        for name, path in src.aux:
            copy_file_atomic(path, dst / name)
            files[name] = _aux_rec(dst / name, checksum)
        md = _metadata(src, plan, plan_d, fp, layout, dict(sorted(files.items())), ranks)
        raw = metadata_bytes(md)
        write_bytes_atomic(dst / METADATA_FILE, raw)
        with contextlib.suppress(FileNotFoundError):
            (dst / IN_PROGRESS_MARKER).unlink()
        write_bytes_atomic(dst / COMPLETE_MARKER, complete_token(raw).encode())
        fsync_dir(dst)
        written = sum(int(v["bytes"]) for v in files.values())
        out = summary(written, len(files), time.monotonic() - t0, fingerprint=fp, skipped=False)
        out["outputDir"] = str(dst)
        out["dirBytes"] = _dir_bytes(dst, {k: int(v["bytes"]) for k, v in files.items()})
        return out


def _only_ranks(
    layout: dict[str, list[OutFile]], plan: ParallelPlan, ranks: range
) -> dict[str, list[OutFile]]:
    """The directories `ranks` read, linked again among themselves (a hard-link source may be
    in a directory another node writes)."""
    keep = pod_dirs(plan, ranks)
    out = {d: layout[d] for d in keep}
    for files in out.values():
        for f in files:
            f.copy_of, f.copies = None, []
    _link_identical(out)
    return out


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
        from dsworker.checkpoint.hf_checkpoint import sha256_file

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


def shard(
    model_path: str | Path,
    save_directory: str | Path,
    plan: ParallelPlan,
    *,
    mtp: bool = False,
    dequantize_fp8: bool = False,
    processes: int = 1,
    checksum: bool = False,
    fingerprint: str | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    space_check: bool = True,
    expected: Expected = Expected(),
    ranks: range | None = None,
) -> dict[str, Any]:
    """Shard a HF checkpoint for `plan` into `save_directory`; returns the summary record.

    Raises CheckpointError / PlanError (exit code 2 in the CLI) for bad input.
    """
    src = hf_source(model_path)
    check_expected(src, expected)
    return write_layout(
        src,
        save_directory,
        plan,
        mtp=mtp,
        dequantize_fp8=dequantize_fp8,
        processes=processes,
        checksum=checksum,
        fingerprint=fingerprint,
        max_file_bytes=max_file_bytes,
        space_check=space_check,
        ranks=ranks,
    )


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """The plan flags, spelled as MindIE's sharder (--moe-tp and --moe_tp both accepted)."""
    p.add_argument("--world-size", "--world_size", type=int, required=True, dest="world_size")
    p.add_argument("--dp", type=int, default=None, help="default: world_size / tp")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--moe-tp", "--moe_tp", type=int, required=True, dest="moe_tp")
    p.add_argument(
        "--moe-ep",
        "--moe_ep",
        type=int,
        default=None,
        dest="moe_ep",
        help="default: world_size / moe_tp",
    )
    p.add_argument(
        "--mtp", action="store_true", help="include the MTP layer (DEEPSEEK_MTP=1 in MindIE)"
    )
    p.add_argument("--dequantize-fp8", action="store_true", help="store FP8 weights as BF16")
    p.add_argument("--processes", type=int, default=1, help="parallel writer processes")
    p.add_argument("--checksum", action="store_true", help="record sha256 of every file")
    p.add_argument(
        "--fingerprint", default=None, help="layout id (default: sha256 of plan+config+index)"
    )
    p.add_argument(
        "--max-file-size", type=int, default=DEFAULT_MAX_FILE_BYTES, help="bytes per output file"
    )


def plan_from_args(args: argparse.Namespace) -> ParallelPlan:
    w = args.world_size
    dp = args.dp if args.dp is not None else (w // args.tp if args.tp else 0)
    ep = args.moe_ep if args.moe_ep is not None else (w // args.moe_tp if args.moe_tp else 0)
    return ParallelPlan(w, dp, args.tp, args.moe_tp, ep)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard",
        help="split a HF checkpoint into the per-rank layout of one plan",
        description="Split a HuggingFace DeepSeek checkpoint into the dsop-sharded/1 layout.",
    )
    p.add_argument("--model-path", "--model_path", required=True, dest="model_path")
    p.add_argument("--save-directory", "--save_directory", required=True, dest="save_directory")
    add_plan_args(p)
    p.add_argument(
        "--expect-architecture",
        choices=("DeepseekV3", "DeepseekV2"),
        help="refuse a checkpoint of another architecture (config.json)",
    )
    p.add_argument(
        "--expect-quantization",
        choices=("auto", "bf16", "fp8", "w8a8", "w8a16"),
        help="refuse a checkpoint in another weight format",
    )
    p.add_argument(
        "--max-seq-len", type=int, help="refuse a checkpoint whose max_position_embeddings is lower"
    )
    p.add_argument(
        "--node-index",
        type=int,
        help="write only this node's ranks (with --devices-per-node) and the shared files: "
        "one node's part of a node-local store",
    )
    p.add_argument("--devices-per-node", type=int, help="ranks per node (with --node-index)")
    p.set_defaults(func=_run, on_error=_on_error)


def _on_error(msg: str) -> None:
    write_termination_log({"error": msg})


def _run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    out = shard(
        args.model_path,
        args.save_directory,
        plan,
        mtp=args.mtp,
        dequantize_fp8=args.dequantize_fp8,
        processes=args.processes,
        checksum=args.checksum,
        fingerprint=args.fingerprint,
        max_file_bytes=args.max_file_size,
        expected=Expected(args.expect_architecture, args.expect_quantization, args.max_seq_len),
        ranks=_node_ranks(args, plan),
    )
    emit_summary(out)
    return 0


def _node_ranks(args: argparse.Namespace, plan: ParallelPlan) -> range | None:
    """The ranks of --node-index (None: all), refused unless they lie inside the world."""
    if args.node_index is None and args.devices_per_node is None:
        return None
    if args.node_index is None or not args.devices_per_node or args.devices_per_node < 1:
        raise PlanError("--node-index and --devices-per-node (>= 1) go together; give both")
    ranks = pod_ranks(args.node_index, args.devices_per_node)
    if args.node_index < 0 or ranks.stop > plan.world_size:
        raise PlanError(
            f"--node-index {args.node_index} x --devices-per-node {args.devices_per_node} is "
            f"outside world size {plan.world_size}; use a node index below "
            f"{plan.world_size // args.devices_per_node}"
        )
    return ranks
