"""Triton kernel of `dsworker::mla_cache_store`: one program per token row.

The latent's norm and the rope rotation run in fp32 registers and are rounded where the reference
rounds (normalised row, weighted row, rotated halves), so the bits match it up to fp32 contraction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kernel(
    kva_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    kv_ptr,
    pe_ptr,
    write_ptr,
    rank,
    half,
    stride_kva,
    stride_cs,
    eps,
    INTERLEAVE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    dt = kv_ptr.dtype.element_ty
    dst = tl.load(write_ptr + row).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    rmask = r < rank
    x = tl.load(kva_ptr + row * stride_kva + r, mask=rmask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / rank + eps)
    normed = (x * rstd).to(dt).to(tl.float32)
    w = tl.load(w_ptr + r, mask=rmask, other=0.0).to(dt).to(tl.float32)
    tl.store(kv_ptr + dst * rank + r, (normed * w).to(dt), mask=rmask)

    j = tl.arange(0, BLOCK_H)
    hmask = j < half
    pe_row = kva_ptr + row * stride_kva + rank
    if INTERLEAVE:
        a = tl.load(pe_row + 2 * j, mask=hmask, other=0.0).to(tl.float32)
        b = tl.load(pe_row + 2 * j + 1, mask=hmask, other=0.0).to(tl.float32)
    else:
        a = tl.load(pe_row + j, mask=hmask, other=0.0).to(tl.float32)
        b = tl.load(pe_row + half + j, mask=hmask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + row * stride_cs + j, mask=hmask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + row * stride_cs + j, mask=hmask, other=0.0).to(tl.float32)
    out = pe_ptr + dst * (2 * half)
    tl.store(out + j, (a * c - b * s).to(dt), mask=hmask)
    tl.store(out + half + j, (b * c + a * s).to(dt), mask=hmask)


def mla_cache_store_triton(
    kv_a: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    write: torch.Tensor,
    interleave: bool,
) -> None:
    """Rows of kv_a [T, rank + rope] into the caches' rows `write` [T]."""
    t = kv_a.shape[0]
    if t == 0:
        return
    if not (kv_cache.is_contiguous() and pe_cache.is_contiguous()):
        raise ValueError("mla_cache_store: the cache pages must be contiguous")
    kv_a = kv_a if kv_a.stride(-1) == 1 else kv_a.contiguous()
    cos = cos if cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0) else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 and sin.stride(0) == cos.stride(0) else sin.contiguous()
    rank, half = kv_cache.shape[-1], pe_cache.shape[-1] // 2
    _store_kernel[(t,)](
        kv_a,
        norm_weight,
        cos,
        sin,
        kv_cache,
        pe_cache,
        write.contiguous(),
        rank,
        half,
        kv_a.stride(0),
        cos.stride(0),
        float(eps),
        INTERLEAVE=interleave,
        BLOCK_R=triton.next_power_of_2(rank),
        BLOCK_H=triton.next_power_of_2(max(half, 1)),
    )
