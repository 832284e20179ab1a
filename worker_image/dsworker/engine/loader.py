"""Fill one rank's model from a sharded layout or an unsharded HF checkpoint.

Sharded (model_sharded_metadata.json + _COMPLETE): refuse incomplete layouts and layouts cut for
another plan (naming every differing field), then read exactly the directories the rank's metadata
entry lists. Unsharded (V2, or any plain HF dir): read the index and cut this rank's slices at start
up with layout.place / owner_dirs / tensor_slice, the same rules the sharder uses.

Bytes come from mmap'd safetensors (headers parsed by checkpoint.safetensors_format; never
pickle). On an accelerator they travel through two reused pinned buffers, alternating, with async
copies on a side stream: the CPU fills one buffer while the other is in flight, and fresh host
memory is never touched (see BENCHMARKS.md). Quantised weights are dequantised on the device after
their bytes arrive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsworker.checkpoint.fsutil import safe_join
from dsworker.checkpoint.safetensors_format import TensorInfo
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.checkpoint.sharded_metadata import is_complete, plan_mismatch, read_metadata
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import (
    COMPLETE_MARKER,
    METADATA_FILE,
    ModelDims,
    ParallelPlan,
    PlanError,
    check_plan,
    owner_dirs,
    parts_for,
    place,
    split_name,
    tensor_slice,
)
from dsworker.model.dequant import dequantize, kind_of
from dsworker.parallel.device import Device

log = logging.getLogger("dsworker.engine.loader")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
COMPANIONS = ("weight_scale_inv", "weight_scale", "weight_offset", "weight_shape")
MAIN_SUFFIXES = ("weight", "weight_packed", "bias", "")
BUFFER_BYTES = 64 << 20
TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.uint8,  # raw codes; dequant decodes them (no float8 kernels needed)
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LoadError(CheckpointError):
    """Weights that cannot fill this rank's model: incomplete layout, other plan, missing tensor."""


@dataclass
class LoadStats:
    """What one rank read: bytes moved to the device, tensors, files, wall time."""

    source: str = ""
    bytes: int = 0
    tensors: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"loaded {self.tensors} tensors, {self.bytes / 1e6:.1f} MB from {len(self.files)} "
            f"{self.source} files in {self.seconds:.2f}s ({self.gbps:.2f} GB/s)"
        )


def canonical(name: str) -> str:
    """GPTQ-style `qweight` is the packed int8 weight under another name (vLLM's lookup set)."""
    return name[: -len("qweight")] + "weight_packed" if name.endswith(".qweight") else name


@dataclass
class _Item:
    """One stored tensor this rank reads, and where its slice sits in the tensor it came from."""

    name: str  # canonical
    path: Path
    info: TensorInfo
    dim: int | None = None
    start: int = 0
    stop: int = 0


class _Files:
    """Open safetensors files: validated header plus a private read-only-in-practice mmap."""

    def __init__(self) -> None:
        self.readers: dict[Path, SafetensorsReader] = {}
        self.maps: dict[Path, tuple[mmap.mmap, torch.Tensor]] = {}

    def header(self, path: Path) -> dict[str, TensorInfo]:
        if path not in self.readers:
            self.readers[path] = SafetensorsReader(path)
        return self.readers[path].tensors

    def tensor(self, item: _Item) -> torch.Tensor:
        """A CPU view of the tensor's bytes in the mapping (copied only when misaligned)."""
        if item.path not in self.maps:
            r = self.readers[item.path]
            mm = mmap.mmap(r.fd, 0, access=mmap.ACCESS_COPY)  # writable view: torch wants one
            self.maps[item.path] = (mm, torch.frombuffer(mm, dtype=torch.uint8))
        t = item.info
        raw = self.maps[item.path][1][t.begin : t.end]
        dtype = TORCH_DTYPES[t.dtype]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if t.begin % itemsize:
            raw = raw.clone()
        return raw.view(dtype).view(t.shape)

    def close(self) -> None:
        for mm, _ in self.maps.values():
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps later
                mm.close()
        for r in self.readers.values():
            r.close()
        self.maps.clear()
        self.readers.clear()


class _Stream:
    """Host -> device through two reused pinned buffers, alternating, async on a side stream."""

    def __init__(self, device: Device, buffer_bytes: int | None = None) -> None:
        self.device = device
        self.stream = device.stream()
        size = buffer_bytes or BUFFER_BYTES
        self.bufs = [device.pinned(size) for _ in range(2)] if self.stream else []
        self.events: list[Any] = [None, None]
        self.turn = 0

    def _slot(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """The next buffer, once the copy that last used it has finished."""
        i = self.turn
        self.turn ^= 1
        if self.events[i] is not None:
            self.events[i].synchronize()
        return i, self.bufs[i][:nbytes]

    def _push(self, i: int, buf: torch.Tensor, dst: torch.Tensor) -> None:
        with self.device.on_stream(self.stream):
            dst.copy_(buf, non_blocking=True)
            self.events[i] = self.device.event()
            self.events[i].record(self.stream)

    def to_device(self, src: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """src (CPU, possibly a strided mmap view) -> a contiguous device tensor (or into `out`)."""
        if self.stream is None:
            return src if out is None else out.copy_(src)
        with self.device.on_stream(self.stream):  # allocations belong to the copy stream
            dst = (
                out
                if out is not None
                else torch.empty(src.shape, dtype=src.dtype, device=self.device.torch)
            )
        cap = self.bufs[0].numel()
        if src.is_contiguous() or src.dim() < 2:
            flat_src = src.contiguous().reshape(-1).view(torch.uint8)
            flat_dst = dst.reshape(-1).view(torch.uint8)
            for a in range(0, flat_src.numel(), cap):
                n = min(cap, flat_src.numel() - a)
                i, buf = self._slot(n)
                buf.copy_(flat_src[a : a + n])
                self._push(i, buf, flat_dst[a : a + n])
            return dst
        rows2d = src.reshape(src.shape[0], -1)  # a dim-1 slice: strided rows
        row_bytes = rows2d.shape[1] * src.element_size()
        if row_bytes > cap:  # a row wider than a buffer (never for DeepSeek): gather it first
            return self.to_device(src.contiguous(), out)
        step = max(1, cap // max(1, row_bytes))
        dst2d = dst.view(dst.shape[0], -1)
        for a in range(0, rows2d.shape[0], step):
            blk = rows2d[a : a + step]
            i, buf = self._slot(blk.numel() * src.element_size())
            buf = buf.view(src.dtype).view(blk.shape)
            buf.copy_(blk)
            self._push(i, buf, dst2d[a : a + step])
        return dst

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def _dims(root: Path) -> ModelDims:
    try:
        return ModelDims.from_config(json.loads((root / "config.json").read_text()))
    except FileNotFoundError:
        raise LoadError(f"{root}: no config.json; not a model directory") from None


def is_sharded(model_dir: str | Path) -> bool:
    return (Path(model_dir) / METADATA_FILE).exists()


def check_sharded(model_dir: str | Path, plan: ParallelPlan, mtp: bool) -> Any:
    """The layout's metadata, if it is complete and cut for this plan; LoadError otherwise."""
    root = Path(model_dir)
    if not (root / COMPLETE_MARKER).exists():
        raise LoadError(
            f"{root}: {COMPLETE_MARKER} is missing, so sharding did not finish; wait for the "
            "sharding Job or shard again"
        )
    if not is_complete(root):
        raise LoadError(
            f"{root}: {COMPLETE_MARKER} does not match {METADATA_FILE} (changed after sharding?); "
            "shard again"
        )
    md = read_metadata(root)
    diff = plan_mismatch(md.plan, plan.record(mtp=mtp))
    if diff:
        raise LoadError(
            f"{root}: shards were cut for another plan: "
            + "; ".join(diff)
            + ". Shard for this plan or run with the shards' plan"
        )
    return md


def _sharded_items(
    root: Path, plan: ParallelPlan, rank: int, mtp: bool, files: _Files
) -> list[_Item]:
    """Every tensor in the files of the directories this rank's metadata entry lists."""
    md = check_sharded(root, plan, mtp)
    items = []
    for rel in md.files_for_rank(rank):  # the files of exactly md.rank(rank).dirs
        path = _join(root, rel, f"{root / METADATA_FILE} files")
        if not path.exists():
            raise LoadError(
                f"{path}: listed in {METADATA_FILE} but missing (staging incomplete?); "
                "stage again or shard again"
            )
        for name, info in files.header(path).items():
            items.append(_Item(canonical(name), path, info))
    return items


def _join(root: Path, rel: Any, what: str) -> Path:
    """root/rel for a file name read from an index or the metadata; never outside the model dir."""
    try:
        return safe_join(root, rel, what)
    except CheckpointError as e:
        raise LoadError(str(e)) from None


def _weight_map(root: Path) -> dict[str, str]:
    idx = root / INDEX_FILE
    if idx.exists():
        try:
            return dict(json.loads(idx.read_text())["weight_map"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise LoadError(f"{idx}: unreadable index ({e}); re-download it") from None
    if (root / SINGLE_FILE).exists():
        return dict.fromkeys(SafetensorsReader(root / SINGLE_FILE).tensors, SINGLE_FILE)
    raise LoadError(f"{root}: neither {INDEX_FILE} nor {SINGLE_FILE}; not a safetensors checkpoint")


def _unsharded_items(
    root: Path, dims: ModelDims, plan: ParallelPlan, rank: int, wanted: set[str], files: _Files
) -> list[_Item]:
    errs = check_plan(dims, plan)
    if errs:
        raise PlanError("; ".join(errs))
    my_dirs = plan.rank_dirs(rank)
    items = []
    for name, fname in _weight_map(root).items():
        canon = canonical(name)
        module, suffix = split_name(canon)
        if f"{module}.weight" not in wanted and canon not in wanted:
            continue  # another rank's slice, or a part this run does not use (MTP off)
        path = _join(root, fname, f"{root / INDEX_FILE} weight_map[{name!r}]")
        info = files.header(path).get(name)
        if info is None:
            raise LoadError(f"{path}: tensor {name} listed in the index is missing; re-download")
        if suffix in COMPANIONS:  # scales etc.: read whole, sliced at dequantisation by offset
            items.append(_Item(canon, path, info))
            continue
        p = place(canon, dims)
        owners = dict(owner_dirs(p, dims, plan))
        part = next((owners[d] for d in my_dirs if d in owners), None)
        if part is None:
            raise LoadError(f"{canon}: rank {rank} loads it but owns no copy (layout rule bug)")
        sl = tensor_slice(canon, info.shape, p, part, parts_for(p.group, plan))
        items.append(_Item(canon, path, info, sl.dim, sl.start, sl.stop))
    return items


def _sliced(t: torch.Tensor, item: _Item) -> torch.Tensor:
    return t if item.dim is None else t.narrow(item.dim, item.start, item.stop - item.start)


def _logical_shape(
    item: _Item, main: torch.Tensor, comp: dict[str, torch.Tensor]
) -> tuple[int, ...]:
    """A packed weight's [out, in] slice shape (weight_shape holds the full width)."""
    if "weight_shape" not in comp:
        return (main.shape[0], main.shape[1] * 4)
    full_in = int(comp["weight_shape"][1])
    if item.dim == 1:
        return (main.shape[0], min(full_in, item.stop * 4) - item.start * 4)
    return (main.shape[0], full_in)


def _groups(items: list[_Item]) -> Iterator[tuple[str, _Item, dict[str, _Item]]]:
    """(module, main tensor, companions) in file order of the main tensors."""
    comps: dict[str, dict[str, _Item]] = {}
    mains: list[tuple[str, _Item]] = []
    for it in items:
        module, suffix = split_name(it.name)
        if suffix in COMPANIONS:
            comps.setdefault(module, {})[suffix] = it
        else:
            mains.append((module, it))
    mains.sort(key=lambda m: (str(m[1].path), m[1].info.begin))
    for module, it in mains:
        yield module, it, comps.get(module, {})


def load_weights(
    targets: dict[str, torch.Tensor],
    model_dir: str | Path,
    plan: ParallelPlan,
    rank: int,
    device: Device,
    *,
    mtp: bool = False,
    fp8_block: tuple[int, int] | None = None,
) -> LoadStats:
    """Fill `targets` (checkpoint name -> local tensor, e.g. DeepseekModel.targets()).

    Raises LoadError naming what is wrong (incomplete layout, other plan, missing tensors).
    """
    root = Path(model_dir)
    t0 = time.perf_counter()
    files = _Files()
    stats = LoadStats()
    copier = _Stream(device)
    try:
        if is_sharded(root):
            stats.source = "sharded"
            items = _sharded_items(root, plan, rank, mtp, files)
        else:
            stats.source = "unsharded"
            items = _unsharded_items(root, _dims(root), plan, rank, set(targets), files)
        block = fp8_block or _dims(root).fp8_block or (128, 128)
        filled = set()
        for module, item, comp_items in _groups(items):
            _, suffix = split_name(item.name)
            key = f"{module}.weight" if suffix in ("weight", "weight_packed") else item.name
            dst = targets.get(key)
            if dst is None:
                continue  # e.g. MTP tensors of a layout when this run does not use MTP
            src = _sliced(files.tensor(item), item)
            comp = {  # weight_shape stays on the host: it is read as Python ints
                s: files.tensor(c).clone()
                if s == "weight_shape"
                else copier.to_device(files.tensor(c))
                for s, c in comp_items.items()
            }
            kind = kind_of(suffix, src.dtype, comp)
            shape = _logical_shape(item, src, comp) if kind == "w8a16" else tuple(src.shape)
            if tuple(dst.shape) != shape:
                raise LoadError(
                    f"{item.path}: {item.name} gives a {list(shape)} slice but this rank's model "
                    f"expects {list(dst.shape)}; the checkpoint does not match config.json or plan"
                )
            stats.bytes += src.numel() * src.element_size()
            stats.tensors += 1
            if kind is None and src.dtype == dst.dtype and dst.is_contiguous():
                copier.to_device(src, out=dst)
            else:
                raw = copier.to_device(src)
                with device.on_stream(copier.stream):
                    if kind is None:
                        dst.copy_(raw)
                    else:
                        r0 = item.start if item.dim == 0 else 0
                        c0 = (item.start * (4 if kind == "w8a16" else 1)) if item.dim == 1 else 0
                        dst.copy_(dequantize(kind, raw, comp, shape, r0, c0, dst.dtype, block))
            filled.add(key)
            if str(item.path) not in stats.files:
                stats.files.append(str(item.path))
        copier.finish()
    finally:
        files.close()
    missing = sorted(set(targets) - filled)
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
    stats.seconds = time.perf_counter() - t0
    log.info("rank %d: %s", rank, stats)
    return stats
