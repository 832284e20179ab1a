"""Routed-expert matmuls on quantised expert stacks: the quantised twins of moe_gate_up / moe_down.

  moe_gate_up_<fmt>(x [T, H], topk_ids [T, k], w13 [E, 2I, H], scales...) -> [T, k, I]
      silu(x @ gate.T) * (x @ up.T), gate = w13[e, :I], up = w13[e, I:]; a zero row for id -1
  moe_down_<fmt>(h [T, k, I], topk_ids, topk_weights [T, k] fp32, w2 [E, H, I], scales...) -> [T, H]
      sum_k weight * (h @ w2[e].T); -1 ids add nothing
Ids are local expert indices (-1: routed to an expert on another rank). Only the routed experts'
weights are read. The reference loops over the experts present, dequantising one slab at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsworker.ops import backends, quant_npu
from dsworker.ops.quant_formats import FP8, W8A8, W8A16, QuantWeight, quantize_per_token
from dsworker.ops.quant_matmul import int8_ref, weight_only_ref

Spec = tuple[str, int, tuple[int, int]]  # (kind, group_size, fp8 block)


def _check_ids(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, kdim: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must be [T={x.shape[0]}, k], got {tuple(ids.shape)}")
    if w.dim() != 3 or x.shape[kdim] != w.shape[2]:
        raise ValueError(f"expert weights {tuple(w.shape)} do not take inputs {tuple(x.shape)}")


def _half(
    kind: str, w: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, up: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """The gate (up=False) or up rows of one expert's w13 with their scales; FP8 keeps its block grid."""
    i = w.shape[0] // 2
    rows = slice(i, None) if up else slice(0, i)
    if kind == FP8:
        return w[rows], s, None, (s.shape[0] // 2 if up else 0)
    return w[rows], s[rows], (o[rows] if o is not None else None), 0


def _rows_matmul(
    spec: Spec,
    rows: torch.Tensor,
    xs: torch.Tensor | None,
    w: torch.Tensor,
    s: torch.Tensor,
    o: torch.Tensor | None,
    row0: int = 0,
) -> torch.Tensor:
    kind, group, block = spec
    if kind == W8A8:
        assert xs is not None
        return int8_ref(rows, xs, w, s, o)
    return weight_only_ref(kind, rows, w, s, group, block, row0)


def _experts(ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    flat = ids.reshape(-1)
    return [(e, (flat == e).nonzero().squeeze(1)) for e in flat.unique().tolist() if e >= 0]


def gate_up_ref(
    spec: Spec,
    x: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
) -> torch.Tensor:
    """Reference gate/up: per expert present, its pairs' rows through the gate and up slabs."""
    _check_ids(x, ids, w13, 1)
    t, k = ids.shape
    out = torch.zeros((t * k, w13.shape[1] // 2), dtype=torch.float32, device=x.device)
    src, xs = quantize_per_token(x) if spec[0] == W8A8 else (x, None)
    for e, pairs in _experts(ids):
        tok = pairs // k
        rows, rs = src[tok], (xs[tok] if xs is not None else None)
        off = offset[e] if offset is not None else None
        g = _rows_matmul(spec, rows, rs, *_half(spec[0], w13[e], scale[e], off, False))
        u = _rows_matmul(spec, rows, rs, *_half(spec[0], w13[e], scale[e], off, True))
        out[pairs] = F.silu(g) * u
    return out.view(t, k, -1).to(x.dtype)


def down_ref(
    spec: Spec,
    h: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w2: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
) -> torch.Tensor:
    """Reference down projection and the weighted sum over the k routed experts of each token."""
    _check_ids(h, ids, w2, 2)
    t, k = ids.shape
    flat_h = h.reshape(t * k, -1)
    out = torch.zeros((t * k, w2.shape[1]), dtype=torch.float32, device=h.device)
    src, hs = quantize_per_token(flat_h) if spec[0] == W8A8 else (flat_h, None)
    rw = weights.reshape(-1).float()
    for e, pairs in _experts(ids):
        off = offset[e] if offset is not None else None
        y = _rows_matmul(
            spec, src[pairs], hs[pairs] if hs is not None else None, w2[e], scale[e], off
        )
        out[pairs] = y * rw[pairs, None]
    return out.view(t, k, -1).sum(1).to(h.dtype)


@torch.library.custom_op("dsworker::moe_gate_up_fp8", mutates_args=())
def moe_gate_up_fp8(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    block_n: int,
    block_k: int,
) -> torch.Tensor:
    """FP8 block-scaled w13; scales [E, 2*ceil(I/bn), ceil(H/bk)] (gate blocks, then up blocks)."""
    return gate_up_ref((FP8, 0, (block_n, block_k)), x, topk_ids, w13, w13_scale_inv, None)


@torch.library.custom_op("dsworker::moe_down_fp8", mutates_args=())
def moe_down_fp8(
    h: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w2: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    block_n: int,
    block_k: int,
) -> torch.Tensor:
    """FP8 block-scaled w2 [E, H, I]; scales [E, ceil(H/bn), ceil(I/bk)]."""
    return down_ref((FP8, 0, (block_n, block_k)), h, topk_ids, topk_weights, w2, w2_scale_inv, None)


@torch.library.custom_op("dsworker::moe_gate_up_w8a16", mutates_args=())
def moe_gate_up_w8a16(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """int8 w13 with scales [E, 2I, 1] per channel or [E, 2I, H/group_size] per group."""
    return gate_up_ref((W8A16, group_size, (1, 1)), x, topk_ids, w13, w13_scale, None)


@torch.library.custom_op("dsworker::moe_down_w8a16", mutates_args=())
def moe_down_w8a16(
    h: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """int8 w2 [E, H, I] with scales [E, H, 1] or [E, H, I/group_size]."""
    return down_ref((W8A16, group_size, (1, 1)), h, topk_ids, topk_weights, w2, w2_scale, None)


@torch.library.custom_op("dsworker::moe_gate_up_w8a8", mutates_args=())
def moe_gate_up_w8a8(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_offset: torch.Tensor | None,
) -> torch.Tensor:
    """int8 w13 [E, 2I, H], scales (offsets) [E, 2I, 1]; x quantised per token once for all k."""
    return gate_up_ref((W8A8, 0, (1, 1)), x, topk_ids, w13, w13_scale, w13_offset)


@torch.library.custom_op("dsworker::moe_down_w8a8", mutates_args=())
def moe_down_w8a8(
    h: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_offset: torch.Tensor | None,
) -> torch.Tensor:
    """int8 w2 [E, H, I], scales (offsets) [E, H, 1]; each (token, k) row of h quantised on its own."""
    return down_ref((W8A8, 0, (1, 1)), h, topk_ids, topk_weights, w2, w2_scale, w2_offset)


GATE_UP = {FP8: moe_gate_up_fp8, W8A16: moe_gate_up_w8a16, W8A8: moe_gate_up_w8a8}
DOWN = {FP8: moe_down_fp8, W8A16: moe_down_w8a16, W8A8: moe_down_w8a8}


def _fake_gate_up(
    x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, *_: object
) -> torch.Tensor:
    _check_ids(x, ids, w13, 1)
    return x.new_empty((ids.shape[0], ids.shape[1], w13.shape[1] // 2))


def _fake_down(
    h: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, w2: torch.Tensor, *_: object
) -> torch.Tensor:
    _check_ids(h, ids, w2, 2)
    return h.new_empty((h.shape[0], w2.shape[1]))


for _kind in GATE_UP:
    GATE_UP[_kind].register_fake(_fake_gate_up)
    DOWN[_kind].register_fake(_fake_down)


def _tail(qw: QuantWeight) -> tuple[object, ...]:
    """The format arguments after the scale, in op order."""
    if qw.kind == FP8:
        return (qw.block[0], qw.block[1])
    return (qw.group_size,) if qw.kind == W8A16 else (qw.offset,)


def quant_gate_up(x: torch.Tensor, ids: torch.Tensor, w13: QuantWeight) -> torch.Tensor:
    """silu(gate) * up of the k routed local experts of each token -> [T, k, I]."""
    return GATE_UP[w13.kind](x, ids, w13.data, w13.scale, *_tail(w13))


def quant_down(
    h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w2: QuantWeight
) -> torch.Tensor:
    """The down projections of h [T, k, I], weighted (fp32) and summed over k -> [T, H]."""
    return DOWN[w2.kind](h, ids, weights, w2.data, w2.scale, *_tail(w2))


def quant_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: QuantWeight, w2: QuantWeight
) -> torch.Tensor:
    """x [T, H] through the k routed local experts of each token, weighted and summed -> [T, H]."""
    return quant_down(quant_gate_up(x, ids, w13), ids, weights, w2)


def _register_cuda() -> None:
    """Triton grouped kernels (`ops/triton/quant_moe.py`), imported on first use."""
    for kind in GATE_UP:

        def gate_up(
            x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor, *tail, kind=kind
        ):  # noqa: ANN002,ANN202
            from dsworker.ops.triton import quant_moe as tm

            return tm.gate_up(kind, x, ids, w, s, *tail)

        def down(
            h: torch.Tensor,
            ids: torch.Tensor,
            wt: torch.Tensor,
            w: torch.Tensor,
            s: torch.Tensor,
            *tail,
            kind=kind,
        ):  # noqa: ANN002,ANN202
            from dsworker.ops.triton import quant_moe as tm

            return tm.down(kind, h, ids, wt, w, s, *tail)

        GATE_UP[kind].register_kernel("cuda")(gate_up)
        DOWN[kind].register_kernel("cuda")(down)


def _npu_gate_up(w8a8: bool):  # noqa: ANN202
    def run(
        x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor, tail: object
    ) -> torch.Tensor:
        k = ids.shape[1]
        off = tail if w8a8 else None
        y = quant_npu.grouped(x.repeat_interleave(k, 0), ids, w, s, off, w8a8)  # type: ignore[arg-type]
        g, u = y.float().chunk(2, dim=-1)
        return (F.silu(g) * u).view(ids.shape[0], k, -1).to(x.dtype)

    return run


def _npu_down(w8a8: bool):  # noqa: ANN202
    def run(
        h: torch.Tensor,
        ids: torch.Tensor,
        wt: torch.Tensor,
        w: torch.Tensor,
        s: torch.Tensor,
        tail: object,
    ) -> torch.Tensor:
        t, k = ids.shape
        off = tail if w8a8 else None
        y = quant_npu.grouped(h.reshape(t * k, -1), ids, w, s, off, w8a8)  # type: ignore[arg-type]
        return (y.float().view(t, k, -1) * wt[..., None].float()).sum(1).to(h.dtype)

    return run


if backends.triton_available():
    _register_cuda()
if backends.npu_available() and quant_npu.load():
    for _kind, _w8a8 in ((W8A16, False), (W8A8, True)):  # no FP8 matmul on Ascend: reference
        GATE_UP[_kind].register_kernel("npu")(_npu_gate_up(_w8a8))
        DOWN[_kind].register_kernel("npu")(_npu_down(_w8a8))
