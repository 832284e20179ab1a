"""The safetensors files that hold one rank's weights: which tensors to read, and their bytes.

Sharded (model_sharded_metadata.json + _COMPLETE): refuse incomplete layouts and layouts cut for
another plan (naming every differing field), then list exactly the files of the directories the
rank's metadata entry names. Unsharded (V2, or any plain HF dir): read the index and cut this rank's
slices with layout.place / owner_dirs / tensor_slice, the same rules the sharder uses. Bytes come
from mmap'd files whose header checkpoint.safetensors_format parsed (never pickle).
"""

from __future__ import annotations

import contextlib
import mmap
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsworker.checkpoint.fsutil import inside, member_file, safe_join
from dsworker.checkpoint.hf_checkpoint import INDEX_FILE, read_model_config, read_weight_map
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
from dsworker.contract.quant import STATIC_COMPANIONS

SINGLE_FILE = "model.safetensors"
COMPANIONS = (
    "weight_scale_inv",
    "weight_scale",
    "weight_offset",
    "weight_shape",
    *STATIC_COMPANIONS,
)
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


def canonical(name: str) -> str:
    """GPTQ-style `qweight` is the packed int8 weight under another name (vLLM's lookup set)."""
    return name[: -len("qweight")] + "weight_packed" if name.endswith(".qweight") else name


@dataclass
class WeightItem:
    """One stored tensor this rank reads, and where its slice sits in the tensor it came from."""

    name: str  # canonical
    path: Path
    info: TensorInfo
    dim: int | None = None
    start: int = 0
    stop: int = 0


class WeightFiles:
    """Open safetensors files: validated header plus a private read-only-in-practice mmap.

    With `register` (direct copies) each file is mapped shared and read-only instead, and the
    whole mapping is offered to `register` (the driver page-locks it in place: a private mapping
    would be copied page by page when locked)."""

    def __init__(self, register: Callable[[torch.Tensor], bool] | None = None) -> None:
        self.readers: dict[Path, SafetensorsReader] = {}
        self.maps: dict[Path, tuple[mmap.mmap, torch.Tensor]] = {}
        self.register = register

    def header(self, path: Path) -> dict[str, TensorInfo]:
        if path not in self.readers:
            self.readers[path] = SafetensorsReader(path)
        return self.readers[path].tensors

    def tensor(self, item: WeightItem) -> torch.Tensor:
        """A CPU view of the tensor's bytes in the mapping (copied only when misaligned)."""
        if item.path not in self.maps:
            self.maps[item.path] = self._map(self.readers[item.path])
        t = item.info
        raw = self.maps[item.path][1][t.begin : t.end]
        dtype = TORCH_DTYPES[t.dtype]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if t.begin % itemsize:
            raw = raw.clone()
        return raw.view(dtype).view(t.shape)

    def _map(self, r: SafetensorsReader) -> tuple[mmap.mmap, torch.Tensor]:
        if self.register is None:
            mm = mmap.mmap(r.fd, 0, access=mmap.ACCESS_COPY)  # writable view: torch wants one
            return mm, torch.frombuffer(mm, dtype=torch.uint8)
        mm = mmap.mmap(r.fd, 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # read-only: the loader only ever reads the bytes
            warnings.filterwarnings("ignore", message=".*not writable.*")
            whole = torch.frombuffer(mm, dtype=torch.uint8)
        self.register(whole)
        return mm, whole

    def close(self) -> None:
        for mm, _ in self.maps.values():
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps later
                mm.close()
        for r in self.readers.values():
            r.close()
        self.maps.clear()
        self.readers.clear()


def model_dims(root: Path) -> ModelDims:
    """The validated config.json's dims (ModelConfigError naming the key when malformed)."""
    return read_model_config(root).dims


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


def sharded_items(
    root: Path, plan: ParallelPlan, rank: int, mtp: bool, files: WeightFiles
) -> list[WeightItem]:
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
            items.append(WeightItem(canonical(name), path, info))
    return items


def _join(root: Path, rel: Any, what: str) -> Path:
    """root/rel for a file name read from an index or the metadata; never outside the model dir,
    by name or through a symlink."""
    try:
        return inside(root, safe_join(root, rel, what), what)
    except CheckpointError as e:
        raise LoadError(str(e)) from None


def _weight_map(root: Path) -> dict[str, str]:
    """The index's weight_map (read as the sharder reads it), else the lone model.safetensors'."""
    try:
        weight_map = read_weight_map(root)
        if weight_map:
            return weight_map
        single = root / SINGLE_FILE
        if single.exists() or single.is_symlink():
            with SafetensorsReader(member_file(root, SINGLE_FILE, "safetensors file")) as r:
                return dict.fromkeys(r.tensors, SINGLE_FILE)
    except CheckpointError as e:  # the loader's own type, keeping the termination reason
        raise LoadError(str(e), reason=e.reason) from None
    raise LoadError(f"{root}: neither {INDEX_FILE} nor {SINGLE_FILE}; not a safetensors checkpoint")


def unsharded_items(
    root: Path, dims: ModelDims, plan: ParallelPlan, rank: int, wanted: set[str], files: WeightFiles
) -> list[WeightItem]:
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
        p = place(canon, dims)
        owners = dict(owner_dirs(p, dims, plan))
        part = next((owners[d] for d in my_dirs if d in owners), None)
        if part is None:
            raise LoadError(f"{canon}: rank {rank} loads it but owns no copy (layout rule bug)")
        # Companions (scales, offsets) get the sharder's cut too: an 8-bit target takes the cut,
        # dequantisation reads them whole and indexes by the weight slice's offset.
        sl = tensor_slice(canon, info.shape, p, part, parts_for(p.group, plan))
        items.append(WeightItem(canon, path, info, sl.dim, sl.start, sl.stop))
    return items


def by_module(items: list[WeightItem]) -> Iterator[tuple[str, WeightItem, dict[str, WeightItem]]]:
    """(module, main tensor, companions) in file order of the main tensors."""
    comps: dict[str, dict[str, WeightItem]] = {}
    mains: list[tuple[str, WeightItem]] = []
    for it in items:
        module, suffix = split_name(it.name)
        if suffix in COMPANIONS:
            comps.setdefault(module, {})[suffix] = it
        else:
            mains.append((module, it))
    mains.sort(key=lambda m: (str(m[1].path), m[1].info.begin))
    for module, it in mains:
        yield module, it, comps.get(module, {})
