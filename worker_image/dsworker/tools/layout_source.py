"""What a sharded layout is cut from: the tensors of a HF checkpoint or of another layout.

`dsworker shard` cuts a HF checkpoint (`hf_source`); reshard and lora-merge cut a sharded layout
read back as whole tensors (tools.sharded_source). Both give a `LayoutSource`, so one writer
serves every command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsworker.checkpoint.hf_checkpoint import open_checkpoint
from dsworker.checkpoint.regions import GlobalTensor
from dsworker.contract.layout import ModelDims, is_mtp


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
    # LoRA to fold in while cutting: weight name -> (lora_A, lora_B, scale); see lora_merge.py
    lora: dict[str, tuple[GlobalTensor, GlobalTensor, float]] = field(default_factory=dict)
    fingerprint_salt: str = ""  # distinguishes e.g. base+adapter from the base alone

    @property
    def has_mtp(self) -> bool:
        return any(is_mtp(n, self.dims) for n in self.tensors)


def hf_source(model_path: str | Path) -> LayoutSource:
    """A HF checkpoint, opened and validated, as a source."""
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
