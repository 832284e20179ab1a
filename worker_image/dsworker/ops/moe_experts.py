"""`dsworker::moe_gate_up` and `dsworker::moe_down`: a token's routed experts in two ops.

Decode routes a handful of tokens to k experts each; reading only those experts' weights (not every
local expert, not sorted/padded copies of the rows) is what bounds the step. The ops take local
expert ids with -1 for a slot whose expert lives on another rank, so one call shape serves every
world size: the caller maps global ids to local ones and sums partial outputs as it does today.
Numerics follow LocalExperts: projections rounded to the weight dtype, SiLU*up in that dtype, the
k expert outputs weighted and summed in fp32, one rounding at the end.
"""

import torch
import torch.nn.functional as F

from dsworker.ops import backends, npu_fused, quant_npu


def _check_ids(topk_ids: torch.Tensor, num_experts: int, what: str) -> None:
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: topk_ids must be [T, k] int32/int64, got {topk_ids.shape}")
    if topk_ids.device.type == "cpu" and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"{what}: topk_ids in [{lo}, {hi}], need [-1, {num_experts})")


def gate_up_reference(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """One matmul per expert present (LocalExperts._loop's math); rows of -1 slots are zeros."""
    t, k = topk_ids.shape
    inter = w13.shape[1] // 2
    out = x.new_zeros(t, k, inter)
    for e in topk_ids[topk_ids >= 0].unique().tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
        out[tok, slot] = F.silu(gate) * up
    return out


def down_reference(
    h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Per expert present: h·w2[e]^T in the weight dtype, then the fp32 weighted sum over k."""
    t, k = topk_ids.shape
    ys = h.new_zeros(t, k, w2.shape[1])
    for e in topk_ids[topk_ids >= 0].unique().tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        ys[tok, slot] = F.linear(h[tok, slot], w2[e])
    weights = topk_weights.float().masked_fill(topk_ids < 0, 0.0)
    return (ys.float() * weights[..., None]).sum(1).to(h.dtype)


@torch.library.custom_op("dsworker::moe_gate_up", mutates_args=())
def moe_gate_up(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """x [T, H], topk_ids [T, k] local ids (-1 = not here), w13 [E, 2I, H] (gate rows, then up
    rows) -> silu(gate) * up [T, k, I] in x.dtype; -1 slots give zeros."""
    _check_ids(topk_ids, w13.shape[0], "moe_gate_up")
    return gate_up_reference(x, topk_ids, w13)


@moe_gate_up.register_fake
def _moe_gate_up_fake(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    return x.new_empty(topk_ids.shape[0], topk_ids.shape[1], w13.shape[1] // 2)


@torch.library.custom_op("dsworker::moe_down", mutates_args=())
def moe_down(
    h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """h [T, k, I], topk_ids [T, k], topk_weights [T, k] fp32, w2 [E, H, I] ->
    sum_k w[t, k] * (h[t, k] · w2[e]^T) [T, H] in h.dtype; -1 slots add nothing."""
    _check_ids(topk_ids, w2.shape[0], "moe_down")
    return down_reference(h, topk_ids, topk_weights, w2)


@moe_down.register_fake
def _moe_down_fake(
    h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    return h.new_empty(topk_ids.shape[0], w2.shape[1])


if backends.triton_available():

    @moe_gate_up.register_kernel("cuda")
    def _moe_gate_up_cuda(
        x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor
    ) -> torch.Tensor:
        from dsworker.ops.triton.moe_experts import moe_gate_up_triton

        return moe_gate_up_triton(x, topk_ids, w13)

    @moe_down.register_kernel("cuda")
    def _moe_down_cuda(
        h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        from dsworker.ops.triton.moe_experts import moe_down_triton

        return moe_down_triton(h, topk_ids, topk_weights, w2)


if backends.npu_available() and quant_npu.load():
    moe_gate_up.register_kernel("npu")(npu_fused.moe_gate_up_npu)
    moe_down.register_kernel("npu")(npu_fused.moe_down_npu)
