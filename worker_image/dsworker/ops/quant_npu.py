"""Ascend implementations of the quantised ops through torch_npu's fused operators (import-guarded).

Written against torch_npu's public API reference (hiascend.com, PyTorch adapter 6.0/7.0 "apilist"):
  npu_dynamic_quant(x) -> (int8 y, fp32 scale per row)
  npu_quantize(x, scales, zero_points, torch.qint8, axis=-1, div_mode=False) -> int8 x*scales+zp
  npu_quant_matmul(x1 int8, x2 int8 [K, N], scale [N] fp32, *, bias [N] int32, output_dtype)
  npu_quant_matmul(x1 int8, x2 int8 [K, N], scale [N], *, pertoken_scale [M], output_dtype)
  npu_weight_quant_batchmatmul(x, weight int8 [K, N], antiquant_scale [1|G, N], ..., antiquant_group_size)
  npu_grouped_matmul([x], [w [E, K, N]], *, scale, antiquant_scale, per_token_scale, group_list,
                     split_item=2, group_type=0, group_list_type=0, output_dtype) -> [y]
Weights are passed as transposed views of the engine's [N, K] layout (the docs allow them).
UNTESTED here (no Ascend machine): every function is small so it can be checked against the reference
on a device with `tests/worker/ops` plus `--device npu` style runs. FP8 has no Ascend matmul.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_NPU: list[ModuleType] = []


def load() -> bool:
    """Import torch_npu once (it registers the `npu` device); False where it fails to import."""
    if not _NPU:
        try:
            _NPU.append(importlib.import_module("torch_npu"))
        except ImportError:
            return False
    return True


def _npu() -> ModuleType:
    return _NPU[0]


def _channel_term(
    xq: torch.Tensor, xs: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """xs * rowsum(xq) * offset * scale: what an asymmetric weight subtracts (the NPU ops take none)."""
    n = scale.shape[-2] if scale.dim() > 1 else scale.shape[-1]
    so = (offset.float() * scale.float()).reshape(-1, n)
    return (xs.float() * xq.float().sum(-1))[:, None] * so


def w8a16_linear(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, group_size: int
) -> torch.Tensor:
    """npu_weight_quant_batchmatmul: antiquant scale [G, N] in x's dtype (bf16/fp16 only)."""
    n = w.shape[0]
    s = scale.reshape(n, -1).t().to(x.dtype)
    gs = group_size if s.shape[0] > 1 else 0
    return _npu().npu_weight_quant_batchmatmul(x, w.t(), s, antiquant_group_size=gs)


def w8a8_linear(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None
) -> torch.Tensor:
    """npu_dynamic_quant then npu_quant_matmul with per-token scales; offsets corrected afterwards."""
    xq, xs = _npu().npu_dynamic_quant(x)
    s = scale.reshape(-1).float()
    y = _npu().npu_quant_matmul(xq, w.t(), s, pertoken_scale=xs, output_dtype=x.dtype)
    if offset is not None:
        y = (y.float() - _channel_term(xq, xs, scale, offset)).to(x.dtype)
    return y


def w8a8_static_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    deq_scale: torch.Tensor,
    input_scale: torch.Tensor,
    input_offset: torch.Tensor,
    quant_bias: torch.Tensor | None,
) -> torch.Tensor:
    """npu_quantize by the reciprocal input scale (div_mode False, scale and offset repeated over
    K in x's dtype, as vllm-ascend's AscendW8A8LinearMethod), then npu_quant_matmul with the
    int32 quant_bias and the fp32 deq_scale (bfloat16 output)."""
    k = x.shape[-1]
    inv = input_scale.to(x.dtype).reciprocal().reshape(1).expand(k).contiguous()
    off = input_offset.to(x.dtype).reshape(1).expand(k).contiguous()
    xq = _npu().npu_quantize(x, inv, off, torch.qint8, -1, False)
    return _npu().npu_quant_matmul(
        xq, w.t(), deq_scale.float(), bias=quant_bias, output_dtype=x.dtype
    )


def sort_rows(
    ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order of the (token, k) pairs by expert, -1 last; cumulative row counts per expert; valid mask)."""
    flat = ids.reshape(-1).long()
    valid = flat >= 0
    key = torch.where(valid, flat, num_experts)
    order = key.argsort(stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return order, torch.cumsum(counts[:num_experts], 0), valid[order]


def grouped(
    x_rows: torch.Tensor,
    ids: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    w8a8: bool = False,
) -> torch.Tensor:
    """Rows x_rows [P, K] (one per (token, k) pair) through w[ids] [E, N, K] -> [P, N], zero for -1.

    W8A8 quantises the sorted rows per token (npu_dynamic_quant) and passes per-channel `scale`;
    W8A16 passes `scale` as antiquant scales [E, G, N] (G = 1 per channel); without `scale` the
    weights are float (bf16/fp16, x's dtype).
    """
    e, n = w.shape[0], w.shape[1]
    order, group_list, valid = sort_rows(ids, e)
    xs_rows = x_rows[order]
    wt = w.transpose(1, 2)
    common = {"group_list": group_list, "split_item": 2, "group_type": 0, "group_list_type": 0}
    if w8a8:
        xq, xsc = _npu().npu_dynamic_quant(xs_rows)
        s = scale.reshape(e, n).float()
        y = _npu().npu_grouped_matmul(
            [xq], [wt], scale=[s], per_token_scale=[xsc], output_dtype=x_rows.dtype, **common
        )[0]
        if offset is not None:
            eid = ids.reshape(-1).long()[order].clamp(min=0)
            so = (offset.float() * scale.float()).reshape(e, n)[eid]
            y = (y.float() - (xsc.float() * xq.float().sum(-1))[:, None] * so).to(x_rows.dtype)
    elif scale is None:
        y = _npu().npu_grouped_matmul([xs_rows], [wt], **common)[0]
    else:
        s = scale.reshape(e, n, -1).transpose(1, 2).to(x_rows.dtype)  # [E, G, N]
        y = _npu().npu_grouped_matmul(
            [xs_rows], [wt], antiquant_scale=[s], output_dtype=x_rows.dtype, **common
        )[0]
    y = torch.where(valid[:, None], y, torch.zeros_like(y))
    return torch.empty_like(y).index_copy_(0, order, y)
