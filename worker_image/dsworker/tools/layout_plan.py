"""Planning a layout's files: every tensor slice placed by the contract's split rules, nothing written.

The result maps each directory of the plan to its files (at most `max_file_bytes` each, a module
never split across two), with identical files across dp replicas planned once and linked.
"""

from __future__ import annotations

from dsworker.checkpoint.planned_files import OutEntry, OutFile
from dsworker.checkpoint.regions import GlobalTensor, region
from dsworker.contract.errors import CheckpointError, PlanError
from dsworker.contract.layout import (
    MOE,
    ParallelPlan,
    Placement,
    Slice,
    check_plan,
    is_mtp,
    local_shape,
    owner_dirs,
    parts_for,
    place,
    pod_dirs,
    split_name,
    tensor_slice,
)
from dsworker.tools.layout_source import LayoutSource

DEFAULT_MAX_FILE_BYTES = 4 << 30


def _scale_of(name: str) -> str:
    return f"{split_name(name)[0]}.weight_scale_inv"


def _fp8_weights(tensors: dict[str, GlobalTensor]) -> set[str]:
    return {n for n, t in tensors.items() if t.dtype == "F8_E4M3" and _scale_of(n) in tensors}


def plan_layout(
    src: LayoutSource,
    plan: ParallelPlan,
    mtp: bool,
    dequant: bool,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> dict[str, list[OutFile]]:
    """Directory -> planned files, every tensor slice placed by layout.py's rules."""
    _check_fits(src, plan, mtp, dequant)
    fp8 = _fp8_weights(src.tensors)
    # the scales of dequantised weights, and of FP8 weights a LoRA delta turns into BF16
    drop = {_scale_of(n) for n in fp8 if dequant or n in src.lora}
    dirs: dict[str, list[OutEntry]] = {d: [] for d in plan.all_dirs()}
    for gt in sorted(src.tensors.values(), key=lambda t: t.order):
        if (not mtp and is_mtp(gt.name, src.dims)) or gt.name in drop:
            continue
        pl = place(gt.name, src.dims)
        parts = parts_for(pl.group, plan)
        if pl.group == MOE and pl.expert is not None and pl.expert >= src.dims.n_routed_experts:
            raise CheckpointError(f"tensor {gt.name}: expert {pl.expert} >= n_routed_experts")
        for d, part in owner_dirs(pl, src.dims, plan):
            sl = tensor_slice(gt.name, gt.shape, pl, part, parts)
            e = OutEntry(
                name=gt.name,
                dtype=gt.dtype,
                shape=local_shape(gt.shape, sl),
                region=region(gt, sl.dim, sl.start, sl.stop),
                global_shape=gt.shape,
                dim=sl.dim,
                part=part if sl.dim is not None else 0,
                parts=parts if sl.dim is not None else 1,
                source_file=gt.source_file,
                order=gt.order,
            )
            _transform(e, src, sl, gt.name in fp8, dequant)
            if gt.name.endswith(".weight_shape") and gt.value is not None:
                _local_weight_shape(e, gt, pl, parts)
            dirs[d].append(e)
    layout = {d: _split_files(d, entries, max_file_bytes) for d, entries in dirs.items()}
    _link_identical(layout)
    return layout


def _check_fits(src: LayoutSource, plan: ParallelPlan, mtp: bool, dequant: bool) -> None:
    """Refuse a plan that does not divide the model, or --mtp without an MTP layer."""
    errs = check_plan(src.dims, plan)
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
            f"model.layers.{src.dims.num_hidden_layers}.); drop --mtp or use a checkpoint with "
            "MTP weights"
        )


def _transform(e: OutEntry, src: LayoutSource, sl: Slice, is_fp8: bool, dequant: bool) -> None:
    """A LoRA delta or FP8 dequantisation to apply to this slice; an FP8 cut checked for blocks."""
    block = src.dims.fp8_block or (128, 128)
    if e.name in src.lora:
        a, b, s = src.lora[e.name]
        e.lora = (region(a, None), region(b, None), s)
        if is_fp8:
            e.dtype, e.block, e.scale = "BF16", block, region(src.tensors[_scale_of(e.name)], None)
    elif is_fp8 and dequant:
        e.dtype, e.transform, e.block = "BF16", "dequant_fp8", block
        e.scale = region(src.tensors[_scale_of(e.name)], None)
    elif is_fp8 and sl.dim is not None and (sl.stop - sl.start) % block[sl.dim]:
        raise PlanError(
            f"FP8 tensor {e.name}: a shard of dim {sl.dim} would be {sl.stop - sl.start} wide, "
            f"not a multiple of the {block[sl.dim]} quantisation block; use a smaller tp/moeTp "
            "or --dequantize-fp8"
        )


def _local_weight_shape(e: OutEntry, gt: GlobalTensor, pl: Placement, parts: int) -> None:
    """A W8A16 weight_shape holds the weight's shape: each slice gets its own, as literal bytes."""
    assert gt.value is not None
    e.global_value = list(gt.value)
    local = list(gt.value)
    if pl.dim is not None and parts > 1 and pl.dim < len(local):
        if local[pl.dim] % parts:
            raise PlanError(
                f"tensor {gt.name}: dim {pl.dim} of size {local[pl.dim]} does not divide "
                f"into {parts} parts; choose a tp/moeTp that divides it"
            )
        local[pl.dim] //= parts
    size = 8 if gt.dtype == "I64" else 4
    e.const = b"".join(int(v).to_bytes(size, "little", signed=True) for v in local)
    e.region = None


def only_ranks(
    layout: dict[str, list[OutFile]], plan: ParallelPlan, ranks: range
) -> dict[str, list[OutFile]]:
    """The directories `ranks` read, linked again among themselves (a hard-link source may be
    in a directory another node writes)."""
    out = {d: layout[d] for d in pod_dirs(plan, ranks)}
    for files in out.values():
        for f in files:
            f.copy_of, f.copies = None, []
    _link_identical(out)
    return out


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
