"""Dense matmuls on quantised weights: one custom op per format, y = x @ w.T in x's dtype.

The default implementation (every device) is the torch reference below: it dequantises TILE_ROWS
weight rows at a time, so no full-precision copy of a weight ever exists. CUDA gets the Triton kernels
of `ops/triton/quant_matmul.py`, Ascend torch_npu's quantised matmuls (`ops/quant_npu.py`).
"""

from __future__ import annotations

import torch

from dsworker.ops import backends, quant_npu
from dsworker.ops.quant_formats import (
    FP8,
    TILE_ROWS,
    W8A16,
    QuantWeight,
    dequant_rows,
    quantize_per_token,
    quantize_static,
)

_EXACT_K = 512  # int8 products summed in fp32 stay exact (< 2**24) over this many columns


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] != w.shape[-1]:
        raise ValueError(
            f"x must be [M, {w.shape[-1]}] for weight {tuple(w.shape)}, got {tuple(x.shape)}"
        )


def weight_only_ref(
    kind: str,
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    group_size: int = 0,
    block: tuple[int, int] = (128, 128),
    scale_row0: int = 0,
) -> torch.Tensor:
    """fp32 x @ dequant(w).T for FP8 / W8A16, one TILE_ROWS slab of w at a time."""
    n = w.shape[0]
    xf = x.float()
    out = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    for a in range(0, n, TILE_ROWS):
        b = min(n, a + TILE_ROWS)
        out[:, a:b] = xf @ dequant_rows(kind, w, scale, a, b, group_size, block, None, scale_row0).T
    return out


def int8_acc(xq: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """int32 xq [M, K] @ wt.T (wt: int8 rows as fp32) summed exactly: fp32 matmuls over 512
    columns are exact on every device (no int GEMM needed), the int32 sum of them too."""
    xqf = xq.float()
    acc = torch.zeros((xq.shape[0], wt.shape[0]), dtype=torch.int32, device=xq.device)
    for c in range(0, wt.shape[1], _EXACT_K):
        acc += (xqf[:, c : c + _EXACT_K] @ wt[:, c : c + _EXACT_K].T).round().to(torch.int32)
    return acc


def int8_ref(
    xq: torch.Tensor,
    xs: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_offset: torch.Tensor | None,
) -> torch.Tensor:
    """fp32 (xq @ (w - offset).T) * xs * w_scale with the int8 products accumulated exactly.

    sum_k xq (q - o) = sum_k xq q - o * sum_k xq: the int32 part is exact, the offset term is one
    multiply per output.
    """
    n = w.shape[0]
    ws = w_scale.reshape(n).float()
    off = w_offset.reshape(n).float() if w_offset is not None else None
    out = torch.empty((xq.shape[0], n), dtype=torch.float32, device=xq.device)
    for a in range(0, n, TILE_ROWS):
        b = min(n, a + TILE_ROWS)
        y = int8_acc(xq, w[a:b].float()).float()
        if off is not None:
            y = y - xq.float().sum(1, keepdim=True) * off[None, a:b]
        out[:, a:b] = y * xs.float()[:, None] * ws[None, a:b]
    return out


def static_ref(
    xq: torch.Tensor, w: torch.Tensor, deq_scale: torch.Tensor, quant_bias: torch.Tensor | None
) -> torch.Tensor:
    """fp32 (xq @ w.T + quant_bias) * deq_scale: the int32 sum and bias exact (npu_quant_matmul)."""
    n = w.shape[0]
    out = torch.empty((xq.shape[0], n), dtype=torch.float32, device=xq.device)
    for a in range(0, n, TILE_ROWS):
        b = min(n, a + TILE_ROWS)
        acc = int8_acc(xq, w[a:b].float())
        if quant_bias is not None:
            acc = acc + quant_bias[a:b].to(torch.int32)[None, :]
        out[:, a:b] = acc.float() * deq_scale[a:b].float()[None, :]
    return out


@torch.library.custom_op("dsworker::fp8_block_linear", mutates_args=())
def fp8_block_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, block_n: int, block_k: int
) -> torch.Tensor:
    """x [M, K] @ (e4m3 w [N, K] * block scale).T -> [M, N]; activations stay in x's dtype."""
    _check(x, w)
    return weight_only_ref(FP8, x, w, w_scale_inv, block=(block_n, block_k)).to(x.dtype)


@torch.library.custom_op("dsworker::w8a16_linear", mutates_args=())
def w8a16_linear(
    x: torch.Tensor, w_int8: torch.Tensor, scale: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x [M, K] @ (int8 w [N, K] * scale per channel or per group of group_size columns).T."""
    _check(x, w_int8)
    return weight_only_ref(W8A16, x, w_int8, scale, group_size).to(x.dtype)


@torch.library.custom_op("dsworker::w8a8_linear", mutates_args=())
def w8a8_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, w_offset: torch.Tensor | None
) -> torch.Tensor:
    """Dynamic per-token int8 x, int8 w [N, K] (minus offset), int32 accumulate, * x_scale * w_scale."""
    _check(x, w_int8)
    xq, xs = quantize_per_token(x)
    return int8_ref(xq, xs, w_int8, w_scale, w_offset).to(x.dtype)


@torch.library.custom_op("dsworker::w8a8_static_linear", mutates_args=())
def w8a8_static_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    deq_scale: torch.Tensor,
    input_scale: torch.Tensor,
    input_offset: torch.Tensor,
    quant_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Static per-tensor int8 x (input_scale, input_offset), int8 w [N, K], int32 accumulate plus
    quant_bias (None: a row-parallel rank other than the first, whose partial sum omits it),
    times deq_scale per output channel."""
    _check(x, w_int8)
    xq = quantize_static(x, input_scale, input_offset)
    return static_ref(xq, w_int8, deq_scale, quant_bias).to(x.dtype)


def _fake(x: torch.Tensor, w: torch.Tensor, *_: object) -> torch.Tensor:
    _check(x, w)
    return x.new_empty((x.shape[0], w.shape[0]))


for _op in (fp8_block_linear, w8a16_linear, w8a8_linear, w8a8_static_linear):
    _op.register_fake(_fake)


def quant_linear(x: torch.Tensor, qw: QuantWeight, partial: bool = False) -> torch.Tensor:
    """x [..., K] through a QuantWeight [N, K] -> [..., N]: the one call the model makes.

    `partial`: this rank's output is one of several row-parallel partial sums that are added up
    afterwards, and not the first: a static weight's quant_bias is left to the first (vllm-ascend).
    """
    flat = x.reshape(-1, x.shape[-1])
    if qw.static is not None:
        st = qw.static
        bias = None if partial else st.bias
        y = w8a8_static_linear(flat, qw.data, qw.scale, st.scale, st.offset, bias)
    elif qw.kind == FP8:
        y = fp8_block_linear(flat, qw.data, qw.scale, qw.block[0], qw.block[1])
    elif qw.kind == W8A16:
        y = w8a16_linear(flat, qw.data, qw.scale, qw.group_size)
    else:
        y = w8a8_linear(flat, qw.data, qw.scale, qw.offset)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _register_cuda() -> None:
    """Triton kernels for CUDA tensors; the kernel module is imported on first use, not here."""

    def fp8(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
        from dsworker.ops.triton import quant_matmul as tq

        return tq.fp8_block_linear(x, w, s, bn, bk)

    def w8a16(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
        from dsworker.ops.triton import quant_matmul as tq

        if not tq.group_supported(group, w.shape[1]):
            return weight_only_ref(W8A16, x, w, s, group).to(x.dtype)
        return tq.w8a16_linear(x, w, s, group)

    def w8a8(
        x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None
    ) -> torch.Tensor:
        from dsworker.ops.triton import quant_matmul as tq

        return tq.w8a8_linear(x, w, s, o)

    def static(
        x: torch.Tensor,
        w: torch.Tensor,
        dq: torch.Tensor,
        s: torch.Tensor,
        o: torch.Tensor,
        b: torch.Tensor | None,
    ) -> torch.Tensor:
        from dsworker.ops.triton import quant_static as ts

        return ts.w8a8_static_linear(x, w, dq, s, o, b)

    fp8_block_linear.register_kernel("cuda")(fp8)
    w8a16_linear.register_kernel("cuda")(w8a16)
    w8a8_linear.register_kernel("cuda")(w8a8)
    w8a8_static_linear.register_kernel("cuda")(static)


if backends.triton_available():
    _register_cuda()
if backends.npu_available() and quant_npu.load():
    # Ascend has no FP8 matmul: FP8 checkpoints are served by the reference (or converted to W8A8).
    w8a16_linear.register_kernel("npu")(quant_npu.w8a16_linear)
    w8a8_linear.register_kernel("npu")(quant_npu.w8a8_linear)
    w8a8_static_linear.register_kernel("npu")(quant_npu.w8a8_static_linear)
