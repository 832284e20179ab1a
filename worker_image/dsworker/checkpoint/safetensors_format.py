"""The safetensors format without I/O: dtypes, the tensor table, building and parsing the header.

A file is an 8-byte little-endian header length, a JSON header mapping names to
dtype/shape/data_offsets (plus an optional `__metadata__`), then the raw data. Parsing validates
everything a corrupt or truncated download could break, a tensor listed twice included, and raises
`SafetensorsError` naming the file, the tensor and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsworker.contract import strict_json
from dsworker.contract.errors import CheckpointError

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# numpy dtype used to hold each safetensors dtype's bytes (BF16 and FP8 as raw bits).
NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "u1",
    "I8": "i1",
    "F8_E4M3": "u1",
    "F8_E5M2": "u1",
    "I16": "<i2",
    "U16": "<u2",
    "F16": "<f2",
    "BF16": "<u2",
    "I32": "<i4",
    "U32": "<u4",
    "F32": "<f4",
    "I64": "<i8",
    "U64": "<u8",
    "F64": "<f8",
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsError(CheckpointError):
    """A safetensors file that is missing, truncated or corrupt."""


def corrupt(path: Path, why: str) -> SafetensorsError:
    """The error for a file whose bytes are wrong: re-downloading it is the fix."""
    return SafetensorsError(f"{path}: {why}; re-download or re-create this file")


def nbytes_of(dtype: str, shape: Iterable[int]) -> int:
    n = DTYPE_SIZES[dtype]
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in its file (absolute offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor about to be written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


def build_header(specs: list[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header (padded with spaces to 8 bytes) for tensors in this order."""
    hdr: dict[str, Any] = {}
    if metadata is not None:
        hdr["__metadata__"] = dict(metadata)
    off = 0
    for s in specs:
        if s.dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown dtype {s.dtype} for {s.name}")
        n = s.nbytes
        hdr[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


@dataclass(frozen=True)
class Header:
    """A parsed, validated header: the tensor table (sorted by offset) and `__metadata__`."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    """Validate the JSON header `raw` of a file of `file_size` bytes (data after 8 + len(raw))."""
    try:  # a tensor listed twice is refused: which of its entries holds the bytes is anyone's guess
        header = strict_json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise corrupt(path, f"corrupt header (not JSON: {e})") from None
    except strict_json.JsonError as e:
        raise corrupt(path, f"corrupt header ({e})") from None
    if not isinstance(header, dict):
        raise corrupt(path, "corrupt header (not a JSON object)")
    data_start = 8 + len(raw)
    meta = header.pop("__metadata__", None)
    infos = [
        _tensor_info(path, name, ent, data_start, file_size - data_start)
        for name, ent in header.items()
    ]
    infos.sort(key=lambda t: (t.begin, t.end))
    for a, b in zip(infos, infos[1:], strict=False):
        if b.begin < a.end:
            raise corrupt(path, f"corrupt header: tensors {a.name} and {b.name} overlap")
    return Header(
        tensors={t.name: t for t in infos},
        metadata=meta if isinstance(meta, dict) else {},
        data_start=data_start,
    )


def _tensor_info(path: Path, name: str, ent: Any, data_start: int, data_len: int) -> TensorInfo:
    """One header entry, checked against its dtype, shape and the data actually present."""
    if not isinstance(ent, dict):
        raise corrupt(path, f"corrupt header entry for tensor {name!r}")
    dtype, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise corrupt(path, f"tensor {name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise corrupt(path, f"tensor {name}: bad shape {shape!r}")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise corrupt(path, f"tensor {name}: bad data_offsets {offs!r}")
    need = nbytes_of(dtype, shape)
    if offs[1] - offs[0] != need:
        raise corrupt(
            path,
            f"tensor {name}: data_offsets span {offs[1] - offs[0]} bytes but "
            f"{dtype}{shape} needs {need}",
        )
    if offs[1] > data_len:
        raise corrupt(
            path,
            f"truncated: tensor {name} ends at data byte {offs[1]} but only {data_len} "
            "data bytes are present (incomplete download?)",
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])
