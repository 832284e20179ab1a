"""Triton GEMMs on quantised weights (CUDA; the CPU interpreter in tests), with plain launchers.

- `_wo_acc`: weight-only tiles. The FP8 or int8 weight is loaded in its stored type and converted in
  registers; each BLOCK_K partial product is scaled by its column's scale for that K range, so one
  loop serves FP8 128x128 blocks (scale[n // 128, k // 128]) and W8A16 channel or group scales.
  BLOCK_K must divide the scale's K extent (128 for FP8, the group size for W8A16).
- `_i8_acc`: int8 x int8 -> int32 tiles (plus sum_k xq when the weight has an offset).
- `_per_token_quant_kernel`: dynamic symmetric int8 per row, rounding half away from zero.

The interpreter (TRITON_INTERPRET=1, set before this module is imported: `triton.jit` picks the
interpreter when it decorates) runs float8 loads and conversions and int8 dots, but its tl.dot on
bfloat16 operands is wrong (numpy has no bf16), so under it DOT_F32 converts both operands to fp32.
On a GPU the dot runs in x's dtype (bf16/fp16) with fp32 accumulation; fp32 x uses IEEE fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsworker.ops import backends

BLOCK_N = 64
BLOCK_K = 128


@triton.jit
def _wo_acc(
    x_rows,
    m_mask,
    w_cols,
    n_mask,
    s_cols,
    ssk,
    K,
    SCALE_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        # no `other`: triton cannot cast a literal to float8; the masked lanes are zeroed below
        w = tl.load(w_cols + rk[:, None], mask=w_mask)
        s = tl.load(s_cols + (k0 // SCALE_K) * ssk, mask=n_mask, other=0.0).to(tl.float32)
        if DOT_F32:
            wf = tl.where(w_mask, w.to(tl.float32), 0.0)
            part = tl.dot(x.to(tl.float32), wf, input_precision="ieee")
        else:
            part = tl.dot(x, tl.where(w_mask, w.to(x.dtype), 0.0).to(x.dtype))
        acc += part * s[None, :]
    return acc


@triton.jit
def _i8_acc(
    xq_rows,
    m_mask,
    w_cols,
    n_mask,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_SUM: tl.constexpr,
):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        xq = tl.load(xq_rows + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        w = tl.load(w_cols + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc += tl.dot(xq, w, out_dtype=tl.int32)
        if ROW_SUM:
            xsum += tl.sum(xq.to(tl.int32), axis=1)
    return acc, xsum


@triton.jit
def _i8_epilogue(acc, xsum, xs, ws_ptr, off_ptr, rn, n_mask, HAS_OFFSET: tl.constexpr):
    """(acc - offset * sum_k xq) * x_scale * w_scale, in fp32."""
    ws = tl.load(ws_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    y = acc.to(tl.float32)
    if HAS_OFFSET:
        off = tl.load(off_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        y -= xsum.to(tl.float32)[:, None] * off[None, :]
    return y * xs[:, None] * ws[None, :]


@triton.jit
def _wo_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    sxm,
    swn,
    ssn,
    ssk,
    sym,
    SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    acc = _wo_acc(
        x_ptr + rm[:, None] * sxm,
        m_mask,
        w_ptr + rn[None, :] * swn,
        n_mask,
        s_ptr + (rn // SCALE_N) * ssn,
        ssk,
        K,
        SCALE_K,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        DOT_F32,
    )
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :], y, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _i8_gemm_kernel(
    xq_ptr,
    xs_ptr,
    w_ptr,
    ws_ptr,
    off_ptr,
    y_ptr,
    M,
    N,
    K,
    sxm,
    swn,
    sym,
    HAS_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    acc, xsum = _i8_acc(
        xq_ptr + rm[:, None] * sxm,
        m_mask,
        w_ptr + rn[None, :] * swn,
        n_mask,
        K,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        HAS_OFFSET,
    )
    xs = tl.load(xs_ptr + rm, mask=m_mask, other=0.0)
    y = _i8_epilogue(acc, xsum, xs, ws_ptr, off_ptr, rn, n_mask, HAS_OFFSET)
    out = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :], out, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, K, sxm, sqm, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * sxm + rk, mask=rk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.max(amax, axis=0) / 127.0
    s = tl.where(s > 0, s, 1.0)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * sxm + rk, mask=rk < K, other=0.0).to(tl.float32) / s
        q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * sqm + rk, q.to(tl.int8), mask=rk < K)
    tl.store(s_ptr + row, s)


def block_m(m: int) -> int:
    """Rows per program: 16 covers decode batches, 64 prefill (tl.dot needs at least 16)."""
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def dot_f32(x: torch.Tensor) -> bool:
    return backends.triton_interpreting() or x.dtype == torch.float32


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _weight_only(
    x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, scale_nk: tuple[int, int], bk: int
) -> torch.Tensor:
    x, w = _rowmajor(x), _rowmajor(w)
    s2 = s.reshape(s.shape[0], -1)
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm = block_m(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, BLOCK_N))
    _wo_gemm_kernel[grid](
        x,
        w,
        s2,
        y,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        s2.stride(0),
        s2.stride(1),
        y.stride(0),
        SCALE_N=scale_nk[0],
        SCALE_K=scale_nk[1],
        BLOCK_M=bm,
        BLOCK_N=BLOCK_N,
        BLOCK_K=bk,
        DOT_F32=dot_f32(x),
    )
    return y


def fp8_block_linear(
    x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block_n: int, block_k: int
) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ (fp8 w [N, K] * 128x128 block scales).T -> [M, N] in x's dtype."""
    if block_k % 16:
        raise ValueError(f"fp8 block_k {block_k} must be a multiple of 16 for the Triton kernel")
    return _weight_only(x, w, s, (block_n, block_k), min(BLOCK_K, _pow2_divisor(block_k)))


def _pow2_divisor(n: int) -> int:
    return n & -n


def group_supported(group_size: int, k: int) -> bool:
    """Group scales need whole BLOCK_K tiles inside a group: a group size that 16 divides."""
    return group_size <= 0 or group_size >= k or group_size % 16 == 0


def w8a16_linear(
    x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x @ (int8 w [N, K] * channel/group scale).T; see group_supported for the group sizes served."""
    k = w.shape[1]
    grouped = s.reshape(w.shape[0], -1).shape[1] > 1
    if not grouped or group_size >= k:
        return _weight_only(x, w, s, (1, 1 << 30), BLOCK_K)
    if not group_supported(group_size, k):
        raise ValueError(f"w8a16 group size {group_size} is not a multiple of 16")
    return _weight_only(x, w, s, (1, group_size), min(BLOCK_K, _pow2_divisor(group_size)))


def per_token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic int8 per row: (q int8 [M, K], scale fp32 [M]); matches quant_formats.quantize_per_token."""
    x = _rowmajor(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        blk = min(1024, triton.next_power_of_2(k))
        _per_token_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=blk)
    return q, s


def w8a8_linear(
    x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, off: torch.Tensor | None
) -> torch.Tensor:
    """Per-token int8 x, int8 w [N, K]: int32 dot, then (acc - off * sum xq) * x_scale * w_scale."""
    xq, xs = per_token_quant(x)
    w = _rowmajor(w)
    m, k = xq.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm = block_m(m)
    ws1 = ws.reshape(n)
    off1 = off.reshape(n) if off is not None else ws1
    grid = (triton.cdiv(m, bm), triton.cdiv(n, BLOCK_N))
    _i8_gemm_kernel[grid](
        xq,
        xs,
        w,
        ws1,
        off1,
        y,
        m,
        n,
        k,
        xq.stride(0),
        w.stride(0),
        y.stride(0),
        HAS_OFFSET=off is not None,
        BLOCK_M=bm,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return y
