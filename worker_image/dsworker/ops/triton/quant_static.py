"""Triton kernels of static W8A8 (msModelSlim "W8A8"): per-tensor input quantisation, then an
int8 x int8 GEMM whose int32 sums take the int32 quant_bias before the fp32 deq_scale.

`_static_quant_kernel` computes what quant_formats.quantize_static does, bit for bit: x in fp32
times the reciprocal input scale (taken in x's dtype inside the kernel, so a call launches no
scale ops of its own), plus the offset, rounded half to even and saturated to [-128, 127]. The
GEMM reuses quant_matmul's `_i8_acc` tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsworker.ops.triton.quant_matmul import BLOCK_K, BLOCK_N, _i8_acc, _rowmajor, block_m


@triton.jit
def _rint(v):
    """Round half to even: floor(v + 0.5), one down where that was a tie onto an odd number."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


# x's dtype as the kernels' rounding code: fp32 (no rounding), bfloat16, float16
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _in_x(v, XR: tl.constexpr):
    """fp32 v rounded half to even to x's dtype, returned in fp32. bfloat16 rounds by its bits:
    the interpreter's bfloat16 cast truncates, a GPU's rounds to even; both give this."""
    if XR == 1:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    elif XR == 2:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _static_quant_kernel(
    x_ptr, q_ptr, scale_ptr, off_ptr, K, sxm, sqm, XR: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    s = _in_x(tl.load(scale_ptr).to(tl.float32), XR)
    inv = _in_x(tl.math.div_rn(1.0, s), XR)
    off = tl.load(off_ptr).to(tl.float32)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * sxm + rk, mask=rk < K, other=0.0).to(tl.float32)
        q = _rint(x * inv + off)
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(q_ptr + row * sqm + rk, q.to(tl.int8), mask=rk < K)


@triton.jit
def _static_gemm_kernel(
    xq_ptr,
    w_ptr,
    dq_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    sxm,
    swn,
    sym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    acc, _ = _i8_acc(
        xq_ptr + rm[:, None] * sxm,
        m_mask,
        w_ptr + rn[None, :] * swn,
        n_mask,
        K,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        False,
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0)[None, :]
    dq = tl.load(dq_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    y = (acc.to(tl.float32) * dq[None, :]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :], y, mask=m_mask[:, None] & n_mask[None, :])


def static_quant(
    x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor
) -> torch.Tensor:
    """int8 [M, K] of x by the per-tensor scale and offset; matches quant_formats.quantize_static."""
    x = _rowmajor(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if m:
        blk = min(1024, triton.next_power_of_2(k))
        _static_quant_kernel[(m,)](
            x, q, input_scale, input_offset, k, x.stride(0), q.stride(0),
            XR=_ROUND[x.dtype], BLOCK=blk,
        )  # fmt: skip
    return q


def w8a8_static_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    deq_scale: torch.Tensor,
    input_scale: torch.Tensor,
    input_offset: torch.Tensor,
    quant_bias: torch.Tensor | None,
) -> torch.Tensor:
    """(static_quant(x) @ w.T + quant_bias) * deq_scale -> [M, N] in x's dtype."""
    xq = static_quant(x, input_scale, input_offset)
    w = _rowmajor(w)
    m, k = xq.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dq = deq_scale.reshape(n).float().contiguous()
    bias = quant_bias.reshape(n).to(torch.int32).contiguous() if quant_bias is not None else dq
    bm = block_m(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, BLOCK_N))
    _static_gemm_kernel[grid](
        xq,
        w,
        dq,
        bias,
        y,
        m,
        n,
        k,
        xq.stride(0),
        w.stride(0),
        y.stride(0),
        HAS_BIAS=quant_bias is not None,
        BLOCK_M=bm,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return y
