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


def expert_stack(kind: str, e: int, n: int, k: int, halves: bool, seed: int) -> dict:
    """A quantised [E, N, K] stack in the ops' layout; w13 (halves) quantises gate and up apart."""
    gen = torch.Generator().manual_seed(seed)
    mats = torch.randn(e, n, k, generator=gen)
    parts = [mats[:, : n // 2], mats[:, n // 2 :]] if halves else [mats]
    data, scales, dense = [], [], []
    for p in parts:
        qs = [
            quant_fp8(m) if kind == "fp8" else quant_int8(m, 32 if kind == "w8a16" else 0)
            for m in p
        ]
        data.append(torch.stack([q for q, _ in qs]))
        scales.append(torch.stack([s for _, s in qs]))
        group = 32 if kind == "w8a16" else 0
        deq = [
            dequant_fp8(q, s) if kind == "fp8" else dequant_int8(q, s, group=group) for q, s in qs
        ]
        dense.append(torch.stack(deq))
    out = {"data": torch.cat(data, 1), "scale": torch.cat(scales, 1), "dense": torch.cat(dense, 1)}
    out["offset"] = None
    if kind == "w8a8":
        off = torch.randint(-3, 4, (e, n, 1), generator=gen).float()
        out["offset"] = off
        out["dense"] = out["dense"] - off.double() * out["scale"].double()
    return out


def tail(kind: str, stack: dict) -> tuple:
    """The op arguments after the scale for a stack from expert_stack."""
    return {"fp8": (128, 128), "w8a16": (32,), "w8a8": (stack["offset"],)}[kind]


def moe_truth(
    kind: str, x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, w13: dict, w2: dict
):
    """(gate_up [T, k, I], out [T, H]) in float64, pair by pair, from the dense dequantised stacks."""
    t, k = ids.shape
    i = w13["dense"].shape[1] // 2
    h = torch.zeros(t, k, i, dtype=torch.float64)
    xin = w8a8_input(x) if kind == "w8a8" else x.double()
    for a in range(t):
        for b in range(k):
            e = int(ids[a, b])
            if e >= 0:
                y = w13["dense"][e] @ xin[a]
                h[a, b] = torch.nn.functional.silu(y[:i]) * y[i:]
    hin = w8a8_input(h.reshape(t * k, i).to(x.dtype)).view(t, k, i) if kind == "w8a8" else h
    out = torch.zeros(t, w2["dense"].shape[1], dtype=torch.float64)
    for a in range(t):
        for b in range(k):
            e = int(ids[a, b])
            if e >= 0:
                out[a] += float(wts[a, b]) * (w2["dense"][e] @ hin[a, b])
    return h, out
