"""Output files planned before any byte is written: their tensors and where each one's bytes come from.

The unit of work of every tool that writes safetensors (shard, merge, reshard, lora-merge) is one
output file (`OutFile`): its tensors in order, each a `Region` of a source tensor plus an optional
transform (FP8 dequantisation, a LoRA delta, a rewritten W8A16 weight_shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dsworker.checkpoint.fsutil import safe_join
from dsworker.checkpoint.regions import Region
from dsworker.checkpoint.safetensors_format import TensorSpec, nbytes_of
from dsworker.checkpoint.safetensors_writer import SafetensorsWriter


@dataclass
class OutEntry:
    """One tensor of an output file and where its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    region: Region | None
    global_shape: tuple[int, ...] = ()
    dim: int | None = None
    part: int = 0
    parts: int = 1
    source_file: str | None = None
    global_value: list[int] | None = None
    transform: str | None = None  # None | "dequant_fp8"
    scale: Region | None = None  # dequant_fp8: the whole weight_scale_inv
    block: tuple[int, int] = (128, 128)
    const: bytes | None = None  # literal bytes (a rewritten weight_shape)
    order: int = 0
    lora: tuple[Region, Region, float] | None = None  # (A [r,in], B [out,r], scale): W += s*B@A

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass
class OutFile:
    """One output safetensors file (path relative to the output root)."""

    relpath: str
    entries: list[OutEntry] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)  # identical files: hard links to this one
    copy_of: str | None = None  # set on a planned file that is a copy of another

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def signature(self) -> tuple:
        """Equal signatures mean byte-identical files (same tensors, same slices, same order)."""
        return tuple(
            (
                e.name,
                e.dtype,
                e.shape,
                e.dim,
                e.part,
                e.parts,
                e.region,
                e.transform,
                e.scale,
                e.const,
            )
            for e in self.entries
        )

    def open_writer(self, root: Path, checksum: bool) -> SafetensorsWriter:
        """A writer for this file under `root` (never outside it), directories made."""
        path = safe_join(root, self.relpath, "output file")
        path.parent.mkdir(parents=True, exist_ok=True)
        specs = [TensorSpec(e.name, e.dtype, e.shape) for e in self.entries]
        return SafetensorsWriter(path, specs, checksum=checksum)


@dataclass(frozen=True)
class FileResult:
    """A committed output file: its size, sha256 when asked, and its other (hard-linked) names."""

    relpath: str
    bytes: int
    sha256: str | None
    copies: tuple[str, ...] = ()
