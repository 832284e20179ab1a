"""Fill one rank's model from a sharded layout or an unsharded HF checkpoint.

`weight_files` lists the tensors this rank reads (refusing layouts cut for another plan) and maps
their bytes; `host_to_device` moves them to the accelerator. Here each lands in its model tensor,
checked against the shape the model expects. 8-bit weights go as stored into the model's 8-bit
slots (their companions into the companion slots); only a float target (kv_b_proj, a BF16-built
model) is dequantised on the device after its bytes arrive. Which slots are 8-bit is the model
builder's decision, contract.precision's per module (config.json's module lists, msModelSlim's
description): a module a checkpoint keeps in BF16 has a BF16 slot and is copied as is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsworker.contract.layout import ParallelPlan, split_name
from dsworker.contract.quant import FP8, W8A8, W8A8_STATIC, W8A16
from dsworker.engine.host_to_device import CopyOptions, HostToDevice
from dsworker.engine.weight_files import (
    LoadError,
    WeightFiles,
    WeightItem,
    by_module,
    is_sharded,
    model_dims,
    sharded_items,
    unsharded_items,
)
from dsworker.model.dequant import dequantize, kind_of
from dsworker.ops.quant_formats import unpack_deq_scale, unpack_w8a16
from dsworker.parallel.device import Device

log = logging.getLogger("dsworker.engine.loader")


@dataclass
class LoadStats:
    """What one rank read: bytes moved to the device, tensors, files, wall time."""

    source: str = ""
    copy: str = ""  # CopyOptions.label
    bytes: int = 0
    direct_bytes: int = 0  # copied straight from registered mappings (scales included)
    staged_bytes: int = 0  # copied through pinned buffers (scales included)
    tensors: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"loaded {self.tensors} tensors, {self.bytes / 1e6:.1f} MB from {len(self.files)} "
            f"{self.source} files in {self.seconds:.2f}s ({self.gbps:.2f} GB/s, {self.copy})"
        )


def _sliced(t: torch.Tensor, item: WeightItem) -> torch.Tensor:
    return t if item.dim is None else t.narrow(item.dim, item.start, item.stop - item.start)


def _logical_shape(
    item: WeightItem, main: torch.Tensor, comp: dict[str, torch.Tensor]
) -> tuple[int, ...]:
    """A packed weight's [out, in] slice shape (weight_shape holds the full width)."""
    if "weight_shape" not in comp:
        return (main.shape[0], main.shape[1] * 4)
    full_in = int(comp["weight_shape"][1])
    if item.dim == 1:
        return (main.shape[0], min(full_in, item.stop * 4) - item.start * 4)
    return (main.shape[0], full_in)


def load_weights(
    targets: dict[str, torch.Tensor],
    model_dir: str | Path,
    plan: ParallelPlan,
    rank: int,
    device: Device,
    *,
    mtp: bool = False,
    fp8_block: tuple[int, int] | None = None,
    copy: CopyOptions | None = None,
) -> LoadStats:
    """Fill `targets` (checkpoint name -> local tensor, e.g. DeepseekModel.targets()).

    `copy`: how the host side feeds the device (threads, direct); default from the environment
    (DSWORKER_LOADER_THREADS, DSWORKER_LOADER_DIRECT).

    Raises LoadError naming what is wrong (incomplete layout, other plan, missing tensors).
    """
    root = Path(model_dir)
    t0 = time.perf_counter()
    copier = HostToDevice(device, options=copy or CopyOptions.from_env())
    files = WeightFiles(copier.register if copier.direct else None)
    stats = LoadStats(copy=copier.options.label)
    filled: set[str] = set()
    try:
        if is_sharded(root):
            stats.source = "sharded"
            items = sharded_items(root, plan, rank, mtp, files)
        else:
            stats.source = "unsharded"
            items = unsharded_items(root, model_dims(root), plan, rank, set(targets), files)
        block = fp8_block or model_dims(root).fp8_block or (128, 128)
        for module, item, comp_items in by_module(items):
            _, suffix = split_name(item.name)
            key = f"{module}.weight" if suffix in ("weight", "weight_packed") else item.name
            dst = targets.get(key)
            if dst is None:
                continue  # e.g. MTP tensors of a layout when this run does not use MTP
            nbytes, companions = _fill(targets, module, item, comp_items, files, copier, block)
            stats.bytes += nbytes
            stats.tensors += 1
            filled.add(key)
            filled.update(companions)
            if str(item.path) not in stats.files:
                stats.files.append(str(item.path))
        copier.finish()
        stats.direct_bytes, stats.staged_bytes = copier.direct_bytes, copier.staged_bytes
    finally:
        copier.close()  # workers stopped and mappings unregistered before they are unmapped
        files.close()
    _check_complete(root, rank, set(targets) - filled)
    stats.seconds = time.perf_counter() - t0
    log.info("rank %d: %s", rank, stats)
    return stats


def _fill(
    targets: dict[str, torch.Tensor],
    module: str,
    item: WeightItem,
    comp_items: dict[str, WeightItem],
    files: WeightFiles,
    copier: HostToDevice,
    block: tuple[int, int],
) -> tuple[int, list[str]]:
    """Copy one stored tensor into its target: as stored into an 8-bit slot, else copied or
    dequantised. The bytes it read and the companion keys it filled."""
    _, suffix = split_name(item.name)
    key = f"{module}.weight" if suffix in ("weight", "weight_packed") else item.name
    dst = targets[key]
    src = _sliced(files.tensor(item), item)
    kind = kind_of(suffix, src.dtype, comp_items)
    _check_deq_scale(comp_items)
    done: list[str] = []
    if dst.dtype in QUANT_DTYPES:
        done = _fill_quant(targets, module, item, src, kind, comp_items, files, copier)
    else:
        _fill_float(dst, item, src, kind, comp_items, files, copier, block)
    return src.numel() * src.element_size(), done


QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
_SLOT_KIND = {torch.float8_e4m3fn: (FP8,), torch.int8: (W8A8, W8A16, W8A8_STATIC)}
_DEQ_SCALE_DTYPES = ("F32", "BF16", "F16", "I64")  # I64: packed by msModelSlim (_held)
# A static W8A8 module's weight scale and offset, which vllm-ascend also accepts: folded into
# deq_scale and quant_bias already, so not held (the memory model does not count them either).
_STATIC_UNUSED = ("weight_scale", "weight_offset")


def _fill_float(
    dst: torch.Tensor,
    item: WeightItem,
    src: torch.Tensor,
    kind: str | None,
    comp_items: dict[str, WeightItem],
    files: WeightFiles,
    copier: HostToDevice,
    block: tuple[int, int],
) -> None:
    """A float target: copied, or dequantised on the device from whole companions."""
    comp = {  # weight_shape stays on the host: it is read as Python ints
        s: files.tensor(c).clone() if s == "weight_shape" else copier.to_device(_held(files, c))
        for s, c in comp_items.items()
    }
    shape = _logical_shape(item, src, comp) if kind == W8A16 else tuple(src.shape)
    _check_shape(item, shape, dst)
    if kind is None:
        _copy(copier, src.view(dst.shape), dst)
        return
    raw = copier.to_device(src)
    with copier.device.on_stream(copier.stream):
        r0 = item.start if item.dim == 0 else 0
        c0 = (item.start * (4 if kind == W8A16 else 1)) if item.dim == 1 else 0
        full = dequantize(kind, raw, comp, shape, r0, c0, dst.dtype, block)
        dst.copy_(full.view(dst.shape))


def _copy(copier: HostToDevice, src: torch.Tensor, dst: torch.Tensor) -> None:
    """src (host, dst's shape) into dst: straight in where dst is one contiguous block of its
    dtype, else through a device copy (a cast, or the strided view of a chunked target)."""
    if src.dtype == dst.dtype and dst.is_contiguous():
        copier.to_device(src, out=dst)
        return
    raw = copier.to_device(src)
    with copier.device.on_stream(copier.stream):
        dst.copy_(raw)


def _splits(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """`target` is `shape` with one dimension split in two (a view the slice fills by a reshape:
    e.g. the shared experts' slice held as chunks of an expert stack, model/shared_fold.py)."""
    if len(target) != len(shape) + 1:
        return False
    return any(
        target[:d] == shape[:d]
        and target[d] * target[d + 1] == shape[d]
        and target[d + 2 :] == shape[d + 1 :]
        for d in range(len(shape))
    )


def _check_shape(item: WeightItem, shape: tuple[int, ...], dst: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(shape) and not _splits(tuple(shape), tuple(dst.shape)):
        raise LoadError(
            f"{item.path}: {item.name} gives a {list(shape)} slice but this rank's model "
            f"expects {list(dst.shape)}; the checkpoint does not match config.json or plan"
        )


def _fill_quant(
    targets: dict[str, torch.Tensor],
    module: str,
    item: WeightItem,
    src: torch.Tensor,
    kind: str | None,
    comp_items: dict[str, WeightItem],
    files: WeightFiles,
    copier: HostToDevice,
) -> list[str]:
    """An 8-bit target: the weight's bytes as stored (W8A16 words unpacked to int8) and each
    companion's slice (the sharder's cut) into its slot. Returns the companion keys filled."""
    key = f"{module}.weight"
    dst = targets[key]
    _check_static(module, kind, comp_items, files, targets)
    if kind not in _SLOT_KIND[dst.dtype]:
        raise LoadError(
            f"{item.path}: {item.name} is stored as {kind or src.dtype} but config.json declares "
            f"{'/'.join(_SLOT_KIND[dst.dtype])} for it and nothing keeps {module} unquantised; "
            "list it in quantization_config.ignore (compressed-tensors) or "
            'modules_to_not_convert (fp8), or as "FLOAT" in the msModelSlim description '
            "(quant_model_description*.json), or fix quantization_config / `quantize`"
        )
    if kind == W8A16:
        comp_shape = (
            files.tensor(comp_items["weight_shape"]) if "weight_shape" in comp_items else None
        )
        shape = _logical_shape(
            item, src, {"weight_shape": comp_shape} if comp_shape is not None else {}
        )
        _check_shape(item, shape, dst)
        raw = copier.to_device(src)
        with copier.device.on_stream(copier.stream):
            dst.copy_(unpack_w8a16(raw, shape[1]).view(dst.shape))
    else:
        _check_shape(item, tuple(src.shape), dst)
        _copy(copier, src.view(torch.uint8).view(dst.shape), dst.view(torch.uint8))
    done = []
    for suffix, c in comp_items.items():
        if suffix == "weight_shape" or (kind == W8A8_STATIC and suffix in _STATIC_UNUSED):
            continue
        slot = targets.get(f"{module}.{suffix}")
        if slot is None:
            raise LoadError(
                f"{c.path}: {c.name} has no place in this rank's {kind} model; the checkpoint "
                "mixes formats"
            )
        csrc = _sliced(_held(files, c), c)
        _check_shape(c, tuple(csrc.shape), slot)
        _copy(copier, csrc.view(slot.shape), slot)
        done.append(f"{module}.{suffix}")
    if f"{module}.weight_offset" in targets and "weight_offset" not in comp_items:
        targets[f"{module}.weight_offset"].zero_()  # symmetric: no offset stored
        done.append(f"{module}.weight_offset")
    return done


def _check_static(
    module: str,
    kind: str | None,
    comp_items: dict[str, WeightItem],
    files: WeightFiles,
    targets: dict[str, torch.Tensor],
) -> None:
    """A static W8A8 module (stored, or held by the model) is static on both sides: LoadError
    naming the module otherwise."""
    held_static = f"{module}.deq_scale" in targets
    if kind == W8A8_STATIC and not held_static:
        c = comp_items["deq_scale"]
        raise LoadError(
            f"{c.path}: {module} is stored as static W8A8 (deq_scale, quant_bias, input_scale) but "
            'the description does not type it "W8A8"; fix quant_model_description*.json'
        )
    if held_static and kind != W8A8_STATIC:
        raise LoadError(
            f'{module}: the msModelSlim description types it "W8A8" (static) but the '
            f"checkpoint stores {kind or 'no'} companions; static W8A8 needs "
            "input_scale, input_offset, quant_bias and deq_scale: re-export it with msModelSlim"
        )


def _check_deq_scale(comp_items: dict[str, WeightItem]) -> None:
    """A deq_scale of another dtype is refused from its header, before any copy."""
    c = comp_items.get("deq_scale")
    if c is not None and c.info.dtype not in _DEQ_SCALE_DTYPES:
        raise LoadError(
            f"{c.path}: {c.name} is {c.info.dtype}; a deq_scale is float32 (bfloat16 exports) "
            "or int64-packed float32 (float16 exports): re-export the model with msModelSlim"
        )


def _held(files: WeightFiles, c: WeightItem) -> torch.Tensor:
    """A companion on the host as the model holds it: an int64-packed deq_scale (msModelSlim's
    float16 exports) as the float32 it carries, so every export computes alike."""
    t = files.tensor(c)
    if c.info.dtype != "I64" or not c.name.endswith(".deq_scale"):
        return t
    try:
        return unpack_deq_scale(t)
    except ValueError as e:
        raise LoadError(f"{c.path}: {c.name}: {e}") from e


def _check_complete(root: Path, rank: int, unfilled: set[str]) -> None:
    """Every model tensor got data; LoadError naming the first few missing otherwise."""
    missing = sorted(unfilled)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        hint = (
            " (the MTP layer: shard/run with the same --mtp)"
            if any(".shared_head." in m or ".eh_proj." in m for m in missing)
            else ""
        )
        raise LoadError(
            f"{root}: rank {rank} found no data for {', '.join(missing[:5])}{more}{hint}"
        )
