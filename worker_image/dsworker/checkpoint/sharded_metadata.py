"""model_sharded_metadata.json: reading, writing, and comparing its plan with a runtime plan.

The sharder writes it, the stager reads per-rank file lists and sizes from it, the engine's loader
reads the tensors of its rank and refuses shards cut for another plan (`plan_mismatch` names each
differing field). Pure Python, no numpy/torch: every image can import it. Read through fsutil.read_regular: a FIFO in
place of the metadata or `_COMPLETE` is refused, never waited on.

Schema (camelCase keys, as in the operator's API):
  format, fingerprint, createdBy,
  plan {worldSize, dp, tp, moeTp, moeEp, mtp, quantization, dequantized},
  model {architecture, numHiddenLayers, numNextnPredictLayers, nRoutedExperts, fp8Block},
  source {path, configSha256, indexSha256, fingerprintSalt?},
  ranks [{rank, dpRank, tpRank, moeEpRank, moeTpRank, dirs, files, bytes}],
  files {relpath: {bytes, sha256?}},
  tensors [{name, file, dtype, shape, globalShape, dim, part, parts, sourceFile?, globalValue?}]
`_COMPLETE` (written last) holds the sha256 of the metadata file. fingerprintSalt marks a layout
that is not the source alone (a merged LoRA adapter); layouts derived from it keep it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsworker.checkpoint.fsutil import read_regular
from dsworker.contract import strict_json
from dsworker.contract.errors import SOURCE_MISSING, CheckpointError
from dsworker.contract.layout import COMPLETE_MARKER, FORMAT, METADATA_FILE, ParallelPlan

PLAN_FIELDS = ("worldSize", "dp", "tp", "moeTp", "moeEp", "mtp", "quantization", "dequantized")
_SNAKE = {
    "world_size": "worldSize",
    "moe_tp": "moeTp",
    "moe_ep": "moeEp",
    "dequantize": "dequantized",
    "dequantize_fp8": "dequantized",
    "dequantizeFp8": "dequantized",
}


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: its file (relative), local and global shape, and which slice it is."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    dim: int | None  # None: the whole tensor (replicated)
    part: int
    parts: int
    source_file: str | None = None
    global_value: list[int] | None = None  # W8A16 weight_shape: the unsharded value

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "file": self.file,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "globalShape": list(self.global_shape),
            "dim": self.dim,
            "part": self.part,
            "parts": self.parts,
        }
        if self.source_file is not None:
            d["sourceFile"] = self.source_file
        if self.global_value is not None:
            d["globalValue"] = self.global_value
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorEntry:
        return cls(
            name=d["name"],
            file=d["file"],
            dtype=d["dtype"],
            shape=tuple(d["shape"]),
            global_shape=tuple(d["globalShape"]),
            dim=d["dim"],
            part=int(d["part"]),
            parts=int(d["parts"]),
            source_file=d.get("sourceFile"),
            global_value=d.get("globalValue"),
        )


@dataclass(frozen=True)
class RankEntry:
    """What one global rank loads: its grid coordinates, directories, files and their total size."""

    rank: int
    dp_rank: int
    tp_rank: int
    moe_ep_rank: int
    moe_tp_rank: int
    dirs: list[str]
    files: list[str] = field(default_factory=list)
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "dpRank": self.dp_rank,
            "tpRank": self.tp_rank,
            "moeEpRank": self.moe_ep_rank,
            "moeTpRank": self.moe_tp_rank,
            "dirs": self.dirs,
            "files": self.files,
            "bytes": self.bytes,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RankEntry:
        return cls(
            rank=int(d["rank"]),
            dp_rank=int(d["dpRank"]),
            tp_rank=int(d["tpRank"]),
            moe_ep_rank=int(d["moeEpRank"]),
            moe_tp_rank=int(d["moeTpRank"]),
            dirs=list(d["dirs"]),
            files=list(d.get("files", [])),
            bytes=int(d.get("bytes", 0)),
        )


@dataclass
class ShardedMetadata:
    """The parsed metadata file of one sharded layout."""

    format: str
    fingerprint: str
    plan: dict[str, Any]
    source: dict[str, Any]
    ranks: list[RankEntry]
    files: dict[str, dict[str, Any]]
    tensors: list[TensorEntry]
    model: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""

    def parallel_plan(self) -> ParallelPlan:
        return ParallelPlan.from_record(self.plan)

    def rank(self, r: int) -> RankEntry:
        for e in self.ranks:
            if e.rank == r:
                return e
        raise CheckpointError(
            f"{METADATA_FILE}: no entry for rank {r} (world size {len(self.ranks)})"
        )

    def files_for_rank(self, r: int) -> list[str]:
        """Relative paths of the safetensors files rank r must read, in the rank's directory order."""
        order = {d: i for i, d in enumerate(self.rank(r).dirs)}
        mine = [f for f in self.files if f.split("/", 1)[0] in order and f.endswith(".safetensors")]
        return sorted(mine, key=lambda f: (order[f.split("/", 1)[0]], f))

    def tensors_for_rank(self, r: int) -> list[TensorEntry]:
        """The stored tensors rank r loads (each tensor once: its rank's slice)."""
        dirs = set(self.rank(r).dirs)
        return [t for t in self.tensors if t.file.split("/", 1)[0] in dirs]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "fingerprint": self.fingerprint,
            "createdBy": self.created_by,
            "plan": self.plan,
            "model": self.model,
            "source": self.source,
            "ranks": [r.to_json() for r in self.ranks],
            "files": self.files,
            "tensors": [t.to_json() for t in self.tensors],
        }

    @classmethod
    def from_json(cls, d: Any, where: str = METADATA_FILE) -> ShardedMetadata:
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: not a JSON object")
        if d.get("format") != FORMAT:
            raise CheckpointError(
                f"{where}: format {d.get('format')!r} is not {FORMAT!r}; re-shard with this dsworker"
            )
        try:
            return cls(
                format=d["format"],
                fingerprint=str(d["fingerprint"]),
                plan=dict(d["plan"]),
                source=dict(d.get("source") or {}),
                ranks=[RankEntry.from_json(r) for r in d["ranks"]],
                files={str(k): dict(v) for k, v in d["files"].items()},
                tensors=[TensorEntry.from_json(t) for t in d["tensors"]],
                model=dict(d.get("model") or {}),
                created_by=str(d.get("createdBy", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(
                f"{where}: malformed metadata ({type(e).__name__}: {e})"
            ) from None


def read_metadata(directory: str | Path) -> ShardedMetadata:
    """Parse <directory>/model_sharded_metadata.json (CheckpointError when missing or malformed)."""
    path = Path(directory) / METADATA_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(
            f"{directory}: does not exist or is not a directory", reason=SOURCE_MISSING
        )
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: not found; {directory} is not a sharded layout")
    try:
        raw = strict_json.loads(read_regular(path, METADATA_FILE))
    except strict_json.JsonError as e:
        raise CheckpointError(f"{path}: {e}; re-shard") from None
    return ShardedMetadata.from_json(raw, str(path))


def metadata_bytes(md: ShardedMetadata) -> bytes:
    """Compact JSON, one tensor per line: DeepSeek-V3 layouts list hundreds of thousands of slices."""
    d = md.to_json()
    tensors = d.pop("tensors")
    head = json.dumps(d, separators=(",", ":"))[:-1]
    lines = ",\n".join(json.dumps(t, separators=(",", ":")) for t in tensors)
    return (head + ',"tensors":[\n' + lines + "\n]}\n").encode()


def complete_token(metadata_file_bytes: bytes) -> str:
    """What `_COMPLETE` holds: the sha256 of the metadata file it seals."""
    return hashlib.sha256(metadata_file_bytes).hexdigest() + "\n"


def read_sealed(directory: str | Path) -> bytes | None:
    """The metadata file's bytes when `_COMPLETE` seals exactly them, else None.

    Returns the bytes that were checked, so a caller that parses or copies them uses what the seal
    covers, not a second read that may have changed in between.
    """
    d = Path(directory)
    try:
        token = read_regular(d / COMPLETE_MARKER, COMPLETE_MARKER).decode().strip()
        raw = read_regular(d / METADATA_FILE, METADATA_FILE)
    except (CheckpointError, NotADirectoryError, UnicodeDecodeError):
        return None
    return raw if token == complete_token(raw).strip() else None


def is_complete(directory: str | Path) -> bool:
    """True when `_COMPLETE` exists and holds the sha256 of the metadata file next to it.

    The sharder and the stager (for its tmpfs copy) both seal this way; nothing else counts, so a
    metadata file changed after sealing is never taken for a complete layout.
    """
    return read_sealed(directory) is not None


def _normalise(plan: Mapping[str, Any] | ParallelPlan) -> dict[str, Any]:
    if isinstance(plan, ParallelPlan):
        return plan.record()
    return {_SNAKE.get(k, k): v for k, v in plan.items()}


def plan_mismatch(
    metadata_plan: Mapping[str, Any] | ParallelPlan, runtime_plan: Mapping[str, Any] | ParallelPlan
) -> list[str]:
    """One message per plan field where the shards and the runtime differ (empty list: they agree).

    Both sides may be camelCase dicts (the metadata's "plan"), snake_case dicts or ParallelPlan
    objects. Only fields the runtime states are compared, so a runtime that does not care about
    e.g. `dequantized` can leave it out; a field the runtime states but the metadata lacks counts
    as a mismatch.
    """
    meta, run = _normalise(metadata_plan), _normalise(runtime_plan)
    out = []
    for k in PLAN_FIELDS:
        if k not in run:
            continue
        if k not in meta:
            out.append(f"{k}: the shards do not record it, the runtime uses {run[k]!r}")
        elif meta[k] != run[k]:
            out.append(f"{k}: the shards were cut for {meta[k]!r}, the runtime uses {run[k]!r}")
    return out
