"""A checkpoint's per-module precision: msModelSlim's description file, read safely, and the check
that the stored tensors are what config.json and that file declare.

The description (quant_model_description*.json beside the weights, also copied into a sharded
layout) is read only as a regular file inside the model directory, as strict JSON; the decision
itself is contract.precision's, shared with the model builder and the memory model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from dsworker.checkpoint.fsutil import load_json, member_file
from dsworker.checkpoint.regions import GlobalTensor
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import split_name
from dsworker.contract.model_config import ModelConfig
from dsworker.contract.precision import (
    LINEAR_LEAVES,
    Precision,
    QuantDescription,
    module_precision,
)
from dsworker.contract.quant import STATIC_COMPANIONS, W8A8_STATIC

DESCRIPTION_PATTERN = re.compile(r"^quant_model_description[A-Za-z0-9_.\-]*\.json$")
_QUANT_DTYPES = ("F8_E4M3", "I8")


def read_quant_description(root: Path) -> QuantDescription | None:
    """The model directory's msModelSlim description, None without one.

    CheckpointError names the file when there are several, or one is a link out of the directory,
    not a regular file, or not strict JSON.
    """
    names = sorted(p.name for p in root.iterdir() if DESCRIPTION_PATTERN.match(p.name))
    if not names:
        return None
    if len(names) > 1:
        raise CheckpointError(
            f"{root}: several msModelSlim description files ({', '.join(names)}); keep the one "
            "written with these weights"
        )
    path = member_file(root, names[0], "msModelSlim description")
    return QuantDescription(str(path), load_json(path, "msModelSlim description"))


def read_precision(root: Path, model: ModelConfig) -> Precision:
    """The precision of each linear module of the checkpoint (or sharded layout) at `root`."""
    return module_precision(model.raw, read_quant_description(root), model.where)


def _stored_quantised(suffix: str, dtype: str) -> bool:
    return dtype in _QUANT_DTYPES or suffix in ("weight_packed", "qweight") or dtype == "I32"


def check_declared(prec: Precision, tensors: Mapping[str, GlobalTensor], cfg: Path) -> None:
    """Every linear weight is stored as declared: quantised unless a declaration keeps it in float.
    CheckpointError names the tensor, its file, the declaration and the fix."""
    if prec.fmt is None:
        return  # a BF16 config: detect_quantization judges int tensors without a declaration
    for name, t in tensors.items():
        module, suffix = split_name(name)
        if suffix not in ("weight", "weight_packed", "qweight"):
            continue
        if module.rsplit(".", 1)[-1] not in LINEAR_LEAVES:
            continue
        why = prec.why_float(module)
        fmt = prec.format_of(module)
        if fmt is not None and fmt.kind == W8A8_STATIC:
            for c in STATIC_COMPANIONS:
                if f"{module}.{c}" not in tensors:
                    raise CheckpointError(
                        f'{t.source_file}: {name} is static W8A8 ("W8A8" in the msModelSlim '
                        f"description) but {module}.{c} is missing; static W8A8 needs "
                        f"{', '.join(STATIC_COMPANIONS)}: re-export the checkpoint with msModelSlim"
                    )
        if _stored_quantised(suffix, t.dtype) and why is not None:
            raise CheckpointError(
                f"{t.source_file}: {name} is stored quantised ({t.dtype}) but it is declared "
                f"unquantised: {why}; remove that declaration or store the weight in BF16"
            )
        if not _stored_quantised(suffix, t.dtype) and why is None:
            raise CheckpointError(
                f"{t.source_file}: {name} is stored as {t.dtype} but {cfg} declares "
                f"{prec.fmt.kind} for it and nothing keeps it unquantised; list it in "
                "quantization_config.ignore (compressed-tensors) or modules_to_not_convert "
                '(fp8), or as "FLOAT" in the msModelSlim description'
            )
