"""Triton grouped expert GEMMs on quantised stacks: each program reads one expert's weight tile only.

The (token, k) pairs are sorted by expert and each expert's run padded to BLOCK_M rows on the device
(`align_by_expert`, no host sync, so CUDA graphs can capture it); a program takes one BLOCK_M run and
one BLOCK_N slice of the outputs. Blocks past the last expert see expert -1 and load nothing. The down
projection writes one fp32 row per pair and the k rows of a token are summed afterwards: no atomics,
so replays repeat bits. Offsets into the stacks are int64 (E * 2I * H passes 2**31 for DeepSeek-V3).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsworker.ops.quant_formats import FP8, W8A8
from dsworker.ops.triton.quant_matmul import (
    BLOCK_K,
    BLOCK_N,
    _i8_acc,
    _i8_epilogue,
    _pow2_divisor,
    _rowmajor,
    _wo_acc,
    dot_f32,
    per_token_quant,
)


def align_by_expert(
    ids: torch.Tensor, num_experts: int, bm: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair index per slot, P = empty; expert per block of bm slots, -1 = none), all on the device."""
    flat = ids.reshape(-1).long()
    p, dev = flat.numel(), flat.device
    key = torch.where(flat >= 0, flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + bm - 1) // bm * bm
    pend = torch.cumsum(padded, 0)
    nblocks = triton.cdiv(p, bm) + min(num_experts, p)
    slots = nblocks * bm
    pstart = torch.cat([pend - padded, torch.tensor([slots], device=dev)])  # -1 ids: a dump slot
    order = key.argsort(stable=True)
    skey = key[order]
    rank = torch.arange(p, device=dev) - (torch.cumsum(counts, 0) - counts)[skey]
    dest = pstart[skey] + torch.where(skey < num_experts, rank, 0)
    buf = torch.full((slots + 1,), p, dtype=torch.int32, device=dev)
    buf[dest] = order.to(torch.int32)
    bexp = torch.searchsorted(pend, torch.arange(nblocks, device=dev) * bm, right=True)
    bexp = torch.where(bexp < num_experts, bexp, -1).to(torch.int32)
    return buf[:slots], bexp


@triton.jit
def _moe_rows(
    pairs_ptr,
    bexp_ptr,
    P,
    N,
    TOPK,
    GATE_UP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """This program's pairs, their input rows, its output columns and its expert (int64, >= 0)."""
    e = tl.load(bexp_ptr + tl.program_id(0))
    p = tl.load(pairs_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    m_mask = p < P
    row = p // TOPK  # gate/up: the token's row of x; down passes TOPK=1: the pair's row of h
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < tl.where(e >= 0, N, 0)  # a block past the last expert loads and stores nothing
    return p, row.to(tl.int64), m_mask, rn, n_mask, tl.maximum(e, 0).to(tl.int64)


@triton.jit
def _moe_store(out_ptr, som, p, rn, m_mask, n_mask, g, u, rw_ptr, GATE_UP: tl.constexpr):
    if GATE_UP:
        val = g * tl.sigmoid(g) * u
    else:
        val = g * tl.load(rw_ptr + p, mask=m_mask, other=0.0)[:, None]
    mask = m_mask[:, None] & n_mask[None, :]
    tl.store(
        out_ptr + p.to(tl.int64)[:, None] * som + rn[None, :],
        val.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _moe_wo_kernel(
    x_ptr,
    pairs_ptr,
    bexp_ptr,
    w_ptr,
    s_ptr,
    rw_ptr,
    out_ptr,
    P,
    N,
    K,
    TOPK,
    sxm,
    swe,
    swn,
    sse,
    ssn,
    ssk,
    som,
    UP_ROW,
    UP_SROW,
    SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr,
    GATE_UP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    p, row, m_mask, rn, n_mask, e = _moe_rows(
        pairs_ptr, bexp_ptr, P, N, TOPK, GATE_UP, BLOCK_M, BLOCK_N
    )
    x_rows = x_ptr + row[:, None] * sxm
    w_e, s_e = w_ptr + e * swe, s_ptr + e * sse
    g = _wo_acc(
        x_rows,
        m_mask,
        w_e + rn[None, :] * swn,
        n_mask,
        s_e + (rn // SCALE_N) * ssn,
        ssk,
        K,
        SCALE_K,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        DOT_F32,
    )
    u = g
    if GATE_UP:
        u = _wo_acc(
            x_rows,
            m_mask,
            w_e + (rn + UP_ROW)[None, :] * swn,
            n_mask,
            s_e + (rn // SCALE_N + UP_SROW) * ssn,
            ssk,
            K,
            SCALE_K,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            DOT_F32,
        )
    _moe_store(out_ptr, som, p, rn, m_mask, n_mask, g, u, rw_ptr, GATE_UP)


@triton.jit
def _moe_i8_kernel(
    xq_ptr,
    xs_ptr,
    pairs_ptr,
    bexp_ptr,
    w_ptr,
    ws_ptr,
    off_ptr,
    rw_ptr,
    out_ptr,
    P,
    N,
    K,
    TOPK,
    sxm,
    swe,
    swn,
    sse,
    som,
    UP_ROW,
    HAS_OFFSET: tl.constexpr,
    GATE_UP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    p, row, m_mask, rn, n_mask, e = _moe_rows(
        pairs_ptr, bexp_ptr, P, N, TOPK, GATE_UP, BLOCK_M, BLOCK_N
    )
    xq_rows = xq_ptr + row[:, None] * sxm
    xs = tl.load(xs_ptr + row, mask=m_mask, other=0.0)
    w_e, ws_e, off_e = w_ptr + e * swe, ws_ptr + e * sse, off_ptr + e * sse
    acc, xsum = _i8_acc(
        xq_rows, m_mask, w_e + rn[None, :] * swn, n_mask, K, BLOCK_M, BLOCK_N, BLOCK_K, HAS_OFFSET
    )
    g = _i8_epilogue(acc, xsum, xs, ws_e, off_e, rn, n_mask, HAS_OFFSET)
    u = g
    if GATE_UP:
        acc, xsum = _i8_acc(
            xq_rows,
            m_mask,
            w_e + (rn + UP_ROW)[None, :] * swn,
            n_mask,
            K,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            HAS_OFFSET,
        )
        u = _i8_epilogue(acc, xsum, xs, ws_e, off_e, rn + UP_ROW, n_mask, HAS_OFFSET)
    _moe_store(out_ptr, som, p, rn, m_mask, n_mask, g, u, rw_ptr, GATE_UP)


def _bm(pairs: int, experts: int) -> int:
    """Rows per expert run: small at decode (few pairs per expert), larger when prefill fills them."""
    avg = pairs / max(1, experts)
    return 16 if avg <= 16 else (32 if avg <= 32 else 64)


def _scale_grid(
    kind: str, scale: torch.Tensor, w: torch.Tensor, tail: tuple
) -> tuple[torch.Tensor, int, int, int]:
    """(scale as [E, rows, cols], SCALE_N, SCALE_K, BLOCK_K) for a weight-only stack."""
    s = scale.reshape(scale.shape[0], scale.shape[1], -1)
    if kind == FP8:
        bn, bk = int(tail[0]), int(tail[1])
        return s, bn, bk, min(BLOCK_K, _pow2_divisor(bk))
    group = int(tail[0])
    if s.shape[2] == 1 or group >= w.shape[2]:
        return s, 1, 1 << 30, BLOCK_K
    if group % 16:
        raise ValueError(f"w8a16 group size {group} is not a multiple of 16")
    return s, 1, group, min(BLOCK_K, _pow2_divisor(group))


def _launch(
    kind: str,
    src: torch.Tensor,
    ids: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    tail: tuple,
    rw: torch.Tensor | None,
) -> torch.Tensor:
    """Rows of `src` (tokens for gate/up, pairs for down) through the routed experts -> [P, N]."""
    # size: two Triton launches whose argument lists the formatter puts one per line; the logic
    # is the first dozen lines, and splitting would only pass the same arguments twice.
    gate_up = rw is None
    t, k = ids.shape
    p, n = t * k, (w.shape[1] // 2 if gate_up else w.shape[1])
    out = torch.zeros((p, n), dtype=src.dtype if gate_up else torch.float32, device=src.device)
    topk = k if gate_up else 1
    bm = _bm(p, w.shape[0])
    pairs, bexp = align_by_expert(ids, w.shape[0], bm)
    grid = (bexp.numel(), triton.cdiv(n, BLOCK_N))
    w = _rowmajor(w)
    rw_t = rw.reshape(-1).float().contiguous() if rw is not None else out
    if kind == W8A8:
        xq, xs = per_token_quant(src)
        ws = scale.reshape(w.shape[0], w.shape[1])
        off = tail[0].reshape(ws.shape) if tail[0] is not None else ws
        _moe_i8_kernel[grid](
            xq,
            xs,
            pairs,
            bexp,
            w,
            ws,
            off,
            rw_t,
            out,
            p,
            n,
            w.shape[2],
            topk,
            xq.stride(0),
            w.stride(0),
            w.stride(1),
            ws.stride(0),
            out.stride(0),
            n,
            HAS_OFFSET=tail[0] is not None,
            GATE_UP=gate_up,
            BLOCK_M=bm,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
        )
        return out
    src = _rowmajor(src)
    s, sn, sk, bk = _scale_grid(kind, scale, w, tail)
    _moe_wo_kernel[grid](
        src,
        pairs,
        bexp,
        w,
        s,
        rw_t,
        out,
        p,
        n,
        w.shape[2],
        topk,
        src.stride(0),
        w.stride(0),
        w.stride(1),
        s.stride(0),
        s.stride(1),
        s.stride(2),
        out.stride(0),
        n,
        s.shape[1] // 2,
        SCALE_N=sn,
        SCALE_K=sk,
        GATE_UP=gate_up,
        BLOCK_M=bm,
        BLOCK_N=BLOCK_N,
        BLOCK_K=bk,
        DOT_F32=dot_f32(src),
    )
    return out


def gate_up(
    kind: str,
    x: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    scale: torch.Tensor,
    *tail: object,
) -> torch.Tensor:
    """moe_gate_up_<kind>: [T, k, I] = silu(gate) * up of each routed expert, zero for -1 ids."""
    return _launch(kind, x, ids, w13, scale, tail, None).view(ids.shape[0], ids.shape[1], -1)


def down(
    kind: str,
    h: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w2: torch.Tensor,
    scale: torch.Tensor,
    *tail: object,
) -> torch.Tensor:
    """moe_down_<kind>: [T, H] = sum_k weight * (h @ w2[e].T)."""
    t, k = ids.shape
    out = _launch(kind, h.reshape(t * k, -1), ids, w2, scale, tail, weights)
    return out.view(t, k, -1).sum(1).to(h.dtype)
