"""Which 8-bit format a checkpoint's config.json declares, and how its weights are stored.

Pure (the operator and the memory model read it from config.json alone): FP8 block from
`quantization_config.quant_method: fp8`, W8A16 from compressed-tensors pack-quantized 8-bit weights
without activation quantisation, W8A8 from MindIE's `quantize: w8a8*` (msModelSlim). msModelSlim's
description may mark single modules "W8A8" (static: per-tensor input scale and offset, per-channel
deq_scale and int32 quant_bias) beside "W8A8_DYNAMIC" ones: W8A8_STATIC, a kind of its own. The stored
companion tensors of each format (names, dtypes, shapes) are listed here once, for the memory model
and the synthesizer's conventions alike. Which linear modules a checkpoint stores in its format
(and which it keeps in BF16) is contract/precision.py's decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FP8 = "fp8"
W8A8 = "w8a8"
W8A16 = "w8a16"
W8A8_STATIC = "w8a8_static"  # msModelSlim "W8A8": static per-tensor activation quantisation
KINDS = (FP8, W8A8, W8A16, W8A8_STATIC)
# A static W8A8 module's companions (tests/data/formats/w8a8_static.json: MindIE's table for
# bfloat16 models): y = (int8(x / input_scale + input_offset) @ W.T + quant_bias) * deq_scale.
STATIC_COMPANIONS = ("input_scale", "input_offset", "quant_bias", "deq_scale")
DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "I8": 1, "I32": 4, "I64": 8}


@dataclass(frozen=True)
class QuantFormat:
    """A checkpoint's 8-bit weight format: kind, W8A16 group size (0: per channel), FP8 block."""

    kind: str
    group_size: int = 0
    block: tuple[int, int] = (128, 128)


def _w8a16(qc: dict[str, Any]) -> QuantFormat | None:
    """compressed-tensors with 8-bit int weights and no input quantisation (weight-only)."""
    if qc.get("quant_method") != "compressed-tensors":
        return None
    for group in (qc.get("config_groups") or {}).values():
        w = (group or {}).get("weights") or {}
        if (
            w.get("num_bits") == 8
            and w.get("type", "int") == "int"
            and not group.get("input_activations")
        ):
            gs = w.get("group_size") if w.get("strategy") == "group" else None
            return QuantFormat(W8A16, int(gs or 0))
    return None


def quant_format(cfg: dict[str, Any]) -> QuantFormat | None:
    """The format config.json declares, or None for a BF16 checkpoint."""
    qc = cfg.get("quantization_config") or {}
    if not isinstance(qc, dict):
        qc = {}
    if qc.get("quant_method") == FP8:
        b = qc.get("weight_block_size") or [128, 128]
        return QuantFormat(FP8, block=(int(b[0]), int(b[1])))
    found = _w8a16(qc)
    if found:
        return found
    if str(cfg.get("quantize") or "").lower().startswith("w8a8"):
        return QuantFormat(W8A8)
    return None


def stored(name: str, shape: tuple[int, int], fmt: QuantFormat) -> list[tuple[str, str, tuple]]:
    """(name, safetensors dtype, shape) of a quantised [N, K] weight and its companions."""
    base = name[: -len(".weight")]
    n, k = shape
    if fmt.kind == FP8:
        bn, bk = fmt.block
        return [
            (name, "F8_E4M3", shape),
            (f"{base}.weight_scale_inv", "F32", (math.ceil(n / bn), math.ceil(k / bk))),
        ]
    if fmt.kind == W8A8_STATIC:
        return [
            (name, "I8", shape),
            (f"{base}.input_scale", "BF16", (1,)),
            (f"{base}.input_offset", "BF16", (1,)),
            (f"{base}.quant_bias", "I32", (n,)),
            (f"{base}.deq_scale", "F32", (n,)),
        ]
    if fmt.kind == W8A8:
        return [
            (name, "I8", shape),
            (f"{base}.weight_scale", "F32", (n, 1)),
            (f"{base}.weight_offset", "F32", (n, 1)),
        ]
    groups = math.ceil(k / fmt.group_size) if fmt.group_size else 1
    return [
        (f"{base}.weight_packed", "I32", (n, k // 4)),
        (f"{base}.weight_scale", "BF16", (n, groups)),
        (f"{base}.weight_shape", "I64", (2,)),
    ]
