"""Triton kernel of `dsworker::rms_norm` / `dsworker::add_rms_norm`: one program per row.

The sum, the norm and the weight product happen in fp32 registers; the results are rounded where
the eager path rounds (residual sum, normalised row, weighted row), so the bits match it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    dim,
    stride_x,
    stride_r,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    mask = d < dim
    dt = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + d, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(dt)
        tl.store(new_res_ptr + row * dim + d, s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / dim + eps)
    normed = (x * rstd).to(dt).to(tl.float32)
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + d, (normed * w).to(dt), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of x [..., D] (plus residual): (normed, residual + x or None), both in x.dtype."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    r2 = residual.reshape(-1, dim) if residual is not None else x2
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    rows = x2.shape[0]
    if rows:
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight.contiguous(),
            out,
            new_res if new_res is not None else out,
            dim,
            x2.stride(0),
            r2.stride(0),
            float(eps),
            HAS_RES=residual is not None,
            BLOCK_D=triton.next_power_of_2(dim),
        )
    return out, new_res
