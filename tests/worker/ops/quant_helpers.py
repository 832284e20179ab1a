"""Quantised test weights built in torch, and float64 truths computed from the same quantised values.

The truth dequantises the whole weight in float64: fine for the small test shapes, and independent of
the tile-wise code under test.
"""

from __future__ import annotations

import torch

from dsworker.ops.quant_formats import cdiv, quantize_per_token

FP8_MAX = 448.0


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest magnitude of the truth (robust to near-zero outputs)."""
    return float(
        (got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30)
    )


def quant_fp8(
    w: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style block quantisation of a 2-D weight: (e4m3 codes, fp32 scale_inv per block)."""
    n, k = w.shape
    bn, bk = block
    pad = torch.zeros(cdiv(n, bn) * bn, cdiv(k, bk) * bk)
    pad[:n, :k] = w.abs()
    amax = pad.view(cdiv(n, bn), bn, cdiv(k, bk), bk).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequant_fp8(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    n, k = q.shape
    full = scale.double().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return q.double() * full


def quant_int8(w: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per channel ([N, 1] scales) or per group of `group` columns ([N, G])."""
    n, k = w.shape
    g = group if group > 0 else k
    pad = torch.zeros(n, cdiv(k, g) * g)
    pad[:, :k] = w
    amax = pad.abs().view(n, -1, g).amax(dim=2)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    full = scale.repeat_interleave(g, 1)[:, :k]
    return (w / full).round().clamp(-127, 127).to(torch.int8), scale


def dequant_int8(
    q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None, group: int = 0
) -> torch.Tensor:
    n, k = q.shape
    g = group if scale.shape[1] > 1 else k
    full = scale.double().repeat_interleave(g, 1)[:, :k]
    qd = q.double() - (offset.double().reshape(n, 1) if offset is not None else 0.0)
    return qd * full


def w8a8_input(x: torch.Tensor) -> torch.Tensor:
    """What a W8A8 matmul multiplies: the per-token quantised activation, in float64."""
    xq, xs = quantize_per_token(x)
    return xq.double() * xs.double()[:, None]
