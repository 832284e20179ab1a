"""Triton kernels of `dsworker::mla_decode`: split-KV flash decoding over the paged latent cache.

Stage 1, program (query row, block of heads, split of keys): the heads of a block share every key
(MLA's latent is one "KV head"), so a key block is loaded once and scored against all of them with
two dots (latent part, rope part), with the online softmax in fp32. The q rope is applied in
registers from the row's cos/sin. One split writes the output; several write fp32 partials and
their log-sum-exp, and stage 2 merges them (long contexts with few rows still fill the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsworker.ops import backends


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """fp32-accumulated a @ b. F32 feeds the products as fp32 (exact for bf16/fp16 operands, so
    the same numbers): triton 3.9's CPU interpreter mis-multiplies bf16 dots."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load_q_pe(qp_ptr, cos_ptr, sin_ptr, n, heads, hmask, d, dmask, half, stride_n, stride_h,
               ROPE: tl.constexpr, INTERLEAVE: tl.constexpr, DT: tl.constexpr):  # fmt: skip
    """The q rope halves [BLOCK_H, BLOCK_P] each, rotated like Rope.apply (rounded to DT)."""
    base = qp_ptr + n * stride_n + heads[:, None] * stride_h
    m2 = hmask[:, None] & dmask[None, :]
    if ROPE and INTERLEAVE:
        a = tl.load(base + 2 * d[None, :], mask=m2, other=0.0).to(tl.float32)
        b = tl.load(base + 2 * d[None, :] + 1, mask=m2, other=0.0).to(tl.float32)
    else:
        a = tl.load(base + d[None, :], mask=m2, other=0.0).to(tl.float32)
        b = tl.load(base + half + d[None, :], mask=m2, other=0.0).to(tl.float32)
    if ROPE:
        c = tl.load(cos_ptr + n * half + d, mask=dmask, other=0.0)[None, :]
        s = tl.load(sin_ptr + n * half + d, mask=dmask, other=0.0)[None, :]
        a, b = a * c - b * s, b * c + a * s
    return a.to(DT), b.to(DT)


@triton.jit
def _mla_split_kernel(
    qn_ptr, qp_ptr, kv_ptr, pe_ptr, pt_ptr, len_ptr, cos_ptr, sin_ptr, out_ptr, lse_ptr,
    heads_n, rank, half, stride_qn_n, stride_qn_h, stride_qp_n, stride_qp_h, stride_pt,
    keys_per_split, scale,
    PAGE: tl.constexpr, ROPE: tl.constexpr, INTERLEAVE: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    n, hb, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < heads_n
    r = tl.arange(0, BLOCK_R)
    rmask = r < rank
    d = tl.arange(0, BLOCK_P)
    dmask = d < half
    dt = kv_ptr.dtype.element_ty
    qmask = hmask[:, None] & rmask[None, :]
    q_ptrs = qn_ptr + n * stride_qn_n + heads[:, None] * stride_qn_h + r[None, :]
    q = tl.load(q_ptrs, mask=qmask, other=0.0).to(dt)
    qa, qb = _load_q_pe(qp_ptr, cos_ptr, sin_ptr, n, heads, hmask, d, dmask, half,
                        stride_qp_n, stride_qp_h, ROPE, INTERLEAVE, dt)  # fmt: skip
    length = tl.load(len_ptr + n)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, length)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for k0 in range(start, end, BLOCK_N):
        pos = k0 + tl.arange(0, BLOCK_N)
        kmask = pos < end
        page = tl.load(pt_ptr + n * stride_pt + pos // PAGE, mask=kmask, other=0)
        row = page.to(tl.int64) * PAGE + pos % PAGE
        kv = tl.load(kv_ptr + row[:, None] * rank + r[None, :],
                     mask=kmask[:, None] & rmask[None, :], other=0.0)  # fmt: skip
        pmask = kmask[:, None] & dmask[None, :]
        pa = tl.load(pe_ptr + row[:, None] * (2 * half) + d[None, :], mask=pmask, other=0.0)
        pb = tl.load(pe_ptr + row[:, None] * (2 * half) + half + d[None, :], mask=pmask, other=0.0)
        s = _dot(q, tl.trans(kv), DOT_F32)
        s += _dot(qa, tl.trans(pa), DOT_F32)
        s += _dot(qb, tl.trans(pb), DOT_F32)
        s = tl.where(kmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(dt), kv, DOT_F32)
        m_i = m_new
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if SPLITS == 1:
        o_ptrs = out_ptr + (n * heads_n + heads[:, None]) * rank + r[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=qmask)
    else:
        slot = (n * heads_n + heads) * SPLITS + split
        tl.store(out_ptr + slot[:, None] * rank + r[None, :], out, mask=qmask)
        lse = tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf"))
        tl.store(lse_ptr + slot, lse, mask=hmask)


@triton.jit
def _mla_merge_kernel(
    part_ptr, lse_ptr, out_ptr, rank,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Program (row*heads + head): the splits' partials weighted by exp(lse - max lse)."""
    nh = tl.program_id(0)
    sp = tl.arange(0, BLOCK_S)
    smask = sp < SPLITS
    r = tl.arange(0, BLOCK_R)
    rmask = r < rank
    lse = tl.load(lse_ptr + nh * SPLITS + sp, mask=smask, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - tl.where(top > float("-inf"), top, 0.0)), 0.0)
    total = tl.sum(w, 0)
    parts = tl.load(part_ptr + (nh * SPLITS + sp[:, None]) * rank + r[None, :],
                    mask=smask[:, None] & rmask[None, :], other=0.0)  # fmt: skip
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + nh * rank + r, out.to(out_ptr.dtype.element_ty), mask=rmask)


def pick_splits(rows: int, head_blocks: int, max_keys: int, block_n: int) -> int:
    """Enough key splits to give ~128 programs, each with at least a few key blocks; static per
    shape (no host sync), so a captured graph keeps it."""
    programs = max(1, rows * head_blocks)
    return max(1, min(128 // programs, triton.cdiv(max_keys, 4 * block_n), 16))


def mla_decode_triton(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    softmax_scale: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    interleave: bool,
    num_splits: int | None = None,
    block_n: int = 32,
    block_h: int = 16,
) -> torch.Tensor:
    """See `dsworker.ops.mla_decode.mla_decode`; num_splits None picks one from the shape."""
    rows, heads, rank = q_nope.shape
    page, half = kv_cache.shape[1], pe_cache.shape[-1] // 2
    out = torch.empty(rows, heads, rank, dtype=q_nope.dtype, device=q_nope.device)
    if rows == 0:
        return out
    head_blocks = triton.cdiv(heads, block_h)
    max_keys = page_table.shape[1] * page
    splits = num_splits or pick_splits(rows, head_blocks, max_keys, block_n)
    per_split = triton.cdiv(triton.cdiv(max_keys, splits), block_n) * block_n
    part = out
    lse = out.new_empty(1, dtype=torch.float32)
    if splits > 1:
        part = out.new_empty(rows, heads, splits, rank, dtype=torch.float32)
        lse = out.new_empty(rows, heads, splits, dtype=torch.float32)
    rope = cos is not None and sin is not None
    cos_t = cos.float().contiguous() if rope else lse
    sin_t = sin.float().contiguous() if rope else lse
    q_nope = q_nope if q_nope.stride(-1) == 1 else q_nope.contiguous()
    q_pe = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
    table = page_table.contiguous()
    _mla_split_kernel[(rows, head_blocks, splits)](
        q_nope, q_pe, kv_cache.contiguous(), pe_cache.contiguous(), table, lengths.contiguous(),
        cos_t, sin_t, part, lse, heads, rank, half, q_nope.stride(0), q_nope.stride(1),
        q_pe.stride(0), q_pe.stride(1), table.stride(0), per_split, float(softmax_scale),
        PAGE=page, ROPE=rope, INTERLEAVE=interleave, SPLITS=splits, BLOCK_H=block_h,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), BLOCK_P=max(16, triton.next_power_of_2(half)),
        BLOCK_N=block_n, DOT_F32=backends.triton_interpreting(),
    )  # fmt: skip
    if splits > 1:
        _mla_merge_kernel[(rows * heads,)](
            part, lse, out, rank, SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            BLOCK_R=triton.next_power_of_2(rank),
        )  # fmt: skip
    return out
