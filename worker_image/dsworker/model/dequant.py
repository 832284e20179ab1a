"""Quantised checkpoint weights -> compute dtype, on the device the raw bytes were copied to.

FP8 block (DeepSeek-V3): w = e4m3(q) * scale_inv[i // 128, j // 128]. W8A8 (MindIE msModelSlim):
w = (int8 - offset) * scale per output channel; its static modules ("W8A8"): w = int8 * deq_scale
/ input_scale (deq_scale = input_scale * weight scale; DeepSeek's linears have no bias, so
quant_bias is -input_offset * sum(int8) and belongs to the activation side: a float target drops
it). W8A16 compressed-tensors pack-quantized: int32 words of four bytes (q + 128, column 4j+b in byte b, little-endian), w = q * scale per channel or group.
`r0`/`c0` say where a slice sits in the tensor the companions describe, so a rank can cut any slice
of an unsharded checkpoint and still pick the right scales (block edges need not align).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dsworker.contract.quant import FP8, W8A8, W8A8_STATIC, W8A16

_ROWS = 2048  # rows dequantised at a time: bounds the fp32 temporaries
_E4M3: dict[torch.device, torch.Tensor] = {}


def kind_of(suffix: str, dtype: torch.dtype, companions: Iterable[str]) -> str | None:
    """Which scheme a module uses, from its main tensor and companion names (None: plain float).

    Packed int8 arrives as `weight_packed`, or as an int32 `weight`/`qweight`: the frameworks that
    only look for one of those names are what breaks W8A16 checkpoints elsewhere.
    """
    names = set(companions)
    if "deq_scale" in names:  # before weight_scale: vllm-ascend allows static's unused one too
        return W8A8_STATIC
    if "weight_scale_inv" in names:
        return FP8
    if suffix == "weight_packed" or (dtype == torch.int32 and "weight_scale" in names):
        return W8A16
    if "weight_scale" in names:
        return W8A8
    return None


def _e4m3_table(device: torch.device) -> torch.Tensor:
    """fp32 value of every e4m3fn code: a gather works on devices without float8 kernels."""
    if device not in _E4M3:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        _E4M3[device] = codes.view(torch.float8_e4m3fn).to(torch.float32).to(device)
    return _E4M3[device]


def _rows(scale: torch.Tensor, r0: int, n: int) -> torch.Tensor:
    """Per-channel scales [out, 1] of rows r0..r0+n (a single row broadcasts)."""
    return scale if scale.shape[0] == 1 else scale[r0 : r0 + n]


def dequantize(
    kind: str,
    raw: torch.Tensor,
    comp: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    r0: int,
    c0: int,
    dtype: torch.dtype,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """The [rows, cols] `shape` slice at (r0, c0) of a quantised weight, in `dtype`."""
    rows, cols = shape
    out = torch.empty(shape, dtype=dtype, device=raw.device)
    for a in range(0, rows, _ROWS):
        b = min(rows, a + _ROWS)
        if kind == FP8:
            q = _e4m3_table(raw.device)[raw[a:b].view(torch.uint8).long()]
            s = comp["weight_scale_inv"].float()
            ri = torch.arange(r0 + a, r0 + b, device=raw.device) // block[0]
            ci = torch.arange(c0, c0 + cols, device=raw.device) // block[1]
            w = q * s[ri][:, ci]
        elif kind == W8A8:
            s = _rows(comp["weight_scale"], r0 + a, b - a).float()
            off = comp.get("weight_offset")
            q = raw[a:b].float()
            w = (q - _rows(off, r0 + a, b - a).float() if off is not None else q) * s
        elif kind == W8A8_STATIC:
            s = comp["deq_scale"].reshape(-1, 1)[r0 + a : r0 + b].float()
            w = raw[a:b].float() * (s / comp["input_scale"].float().reshape(1, 1))
        elif kind == W8A16:
            q = raw[a:b].contiguous().view(torch.uint8)[:, :cols].float() - 128.0
            s = comp["weight_scale"].float()
            s = s if s.shape[0] == 1 else s[r0 + a : r0 + b]
            if s.shape[1] > 1:  # group scales: group size from the full width the scales cover
                full = int(comp["weight_shape"][1]) if "weight_shape" in comp else cols
                group = -(-full // s.shape[1])
                s = s[:, torch.arange(c0, c0 + cols, device=raw.device) // group]
            w = q * s
        else:
            raise ValueError(f"unknown quantisation {kind!r}")
        out[a:b] = w.to(dtype)
    return out
