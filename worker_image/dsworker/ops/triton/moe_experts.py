"""Triton kernels of `dsworker::moe_gate_up` / `dsworker::moe_down` for small token counts.

Each program reads only the weight rows of the expert its (token, slot) was routed to, so a decode
step reads k experts per token and never the rest; a slot with id -1 (expert on another rank)
reads nothing. Products accumulate in fp32 and are rounded where the eager path rounds (after each
projection, after SiLU, after SiLU*up), so the kernels reproduce its numbers, not just approach them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_up_kernel(
    x_ptr,
    ids_ptr,
    w_ptr,
    out_ptr,
    hidden,
    inter,
    stride_xt,
    stride_we,
    stride_wn,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (token*k + slot, block of I): silu(x·gate rows) * (x·up rows)."""
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < inter
    dt = out_ptr.dtype.element_ty
    e = tl.load(ids_ptr + row)
    if e >= 0:
        t = row // TOP_K
        gate_rows = w_ptr + e.to(tl.int64) * stride_we + n[:, None] * stride_wn
        up_rows = gate_rows + inter * stride_wn
        acc_g = tl.zeros([BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_N], tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            hmask = h < hidden
            xv = tl.load(x_ptr + t * stride_xt + h, mask=hmask, other=0.0).to(tl.float32)
            m2 = nmask[:, None] & hmask[None, :]
            g = tl.load(gate_rows + h[None, :], mask=m2, other=0.0).to(tl.float32)
            u = tl.load(up_rows + h[None, :], mask=m2, other=0.0).to(tl.float32)
            acc_g += tl.sum(g * xv[None, :], 1)
            acc_u += tl.sum(u * xv[None, :], 1)
        gate = acc_g.to(dt).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        out = silu * acc_u.to(dt).to(tl.float32)
        tl.store(out_ptr + row * inter + n, out.to(dt), mask=nmask)
    else:
        tl.store(out_ptr + row * inter + n, tl.zeros([BLOCK_N], dt), mask=nmask)


@triton.jit
def _down_kernel(
    h_ptr,
    ids_ptr,
    wts_ptr,
    w_ptr,
    out_ptr,
    hidden,
    inter,
    stride_we,
    stride_wn,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Program (token, block of H): sum over the k slots in registers, so no atomics and the same
    bits on every run (a captured graph replays the eager step exactly)."""
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < hidden
    dt = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j)
        if e >= 0:
            rows = w_ptr + e.to(tl.int64) * stride_we + n[:, None] * stride_wn
            acc = tl.zeros([BLOCK_N], tl.float32)
            for i0 in range(0, inter, BLOCK_I):
                i = i0 + tl.arange(0, BLOCK_I)
                imask = i < inter
                hv = tl.load(h_ptr + (t * TOP_K + j) * inter + i, mask=imask, other=0.0)
                wv = tl.load(rows + i[None, :], mask=nmask[:, None] & imask[None, :], other=0.0)
                acc += tl.sum(wv.to(tl.float32) * hv.to(tl.float32)[None, :], 1)
            total += acc.to(dt).to(tl.float32) * tl.load(wts_ptr + t * TOP_K + j)
    tl.store(out_ptr + t * hidden + n, total.to(dt), mask=nmask)


def _last_dim_contiguous(w: torch.Tensor) -> torch.Tensor:
    return w if w.stride(-1) == 1 else w.contiguous()


def moe_gate_up_triton(
    x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor, block_n: int = 32
) -> torch.Tensor:
    """x [T, H], ids [T, k] (-1 = skip), w13 [E, 2I, H] -> [T, k, I] in x.dtype."""
    t, k = topk_ids.shape
    inter = w13.shape[1] // 2
    x, w13 = _last_dim_contiguous(x), _last_dim_contiguous(w13)
    ids = topk_ids.contiguous()
    out = torch.empty(t, k, inter, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    grid = (t * k, triton.cdiv(inter, block_n))
    _gate_up_kernel[grid](
        x,
        ids,
        w13,
        out,
        x.shape[1],
        inter,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        TOP_K=k,
        BLOCK_N=block_n,
        BLOCK_H=min(256, triton.next_power_of_2(x.shape[1])),
    )
    return out


def moe_down_triton(
    h: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w2: torch.Tensor,
    block_n: int = 32,
) -> torch.Tensor:
    """h [T, k, I], ids [T, k], weights [T, k] fp32, w2 [E, H, I] -> [T, H] in h.dtype."""
    t, k = topk_ids.shape
    hidden, inter = w2.shape[1], w2.shape[2]
    w2 = _last_dim_contiguous(w2)
    out = torch.empty(t, hidden, dtype=h.dtype, device=h.device)
    if t == 0:
        return out
    _down_kernel[(t, triton.cdiv(hidden, block_n))](
        h.contiguous(),
        topk_ids.contiguous(),
        topk_weights.float().contiguous(),
        w2,
        out,
        hidden,
        inter,
        w2.stride(0),
        w2.stride(1),
        TOP_K=k,
        BLOCK_N=block_n,
        BLOCK_I=min(256, triton.next_power_of_2(inter)),
    )
    return out
