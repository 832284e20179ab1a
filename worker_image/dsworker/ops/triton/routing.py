"""Triton kernel of `dsworker::moe_route`: one program routes one token row, all in registers.

Selections are argmax loops (lowest index wins a tie), so no sort, no scatter and no host sync; the
expert count (256 for V3) fits one block. Scores are fp32 whatever the logits' dtype. N_SHARED
always-selected columns (the shared experts: ids shared_first.., weight 1) follow the top k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP_NONE, GROUP_MAX, GROUP_TOP2 = 0, 1, 2


@triton.jit
def _keep_top_groups(
    choice,
    offs,
    per,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """-inf outside the TOPK_GROUP best groups (group score: max, or sum of the top two)."""
    gid = offs // per
    goffs = tl.arange(0, BLOCK_G)
    gscore = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for g in tl.static_range(N_GROUP):
        vals = tl.where(gid == g, choice, float("-inf"))
        best = tl.max(vals, 0)
        if GROUP_MODE == 2:
            first = tl.min(tl.where(vals == best, offs, 1 << 30), 0)
            best = best + tl.max(tl.where(offs == first, float("-inf"), vals), 0)
        gscore = tl.where(goffs == g, best, gscore)
    allowed = offs < 0
    for _ in tl.static_range(TOPK_GROUP):
        top = tl.max(gscore, 0)
        gi = tl.min(tl.where(gscore == top, goffs, BLOCK_G), 0)
        allowed = allowed | (gid == gi)
        gscore = tl.where(goffs == gi, float("-inf"), gscore)
    return tl.where(allowed, choice, float("-inf"))


@triton.jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    stride_t,
    n_experts,
    per_group,
    scale,
    shared_first,
    HAS_BIAS: tl.constexpr,
    SOFTMAX: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    N_SHARED: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < n_experts
    x = tl.load(logits_ptr + t * stride_t + offs, mask=valid, other=float("-inf")).to(tl.float32)
    if SOFTMAX:
        p = tl.where(valid, tl.exp(x - tl.max(x, 0)), 0.0)
        scores = p / tl.sum(p, 0)
    else:
        scores = tl.where(valid, tl.sigmoid(x), 0.0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if GROUP_MODE != 0:
        choice = _keep_top_groups(choice, offs, per_group, N_GROUP, TOPK_GROUP, GROUP_MODE, BLOCK_G)
    koffs = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], tl.float32)
    ids = tl.zeros([BLOCK_K], tl.int32)
    for j in tl.static_range(TOP_K):
        top = tl.max(choice, 0)
        i = tl.min(tl.where(choice == top, offs, BLOCK_E), 0)
        weights = tl.where(koffs == j, tl.sum(tl.where(offs == i, scores, 0.0), 0), weights)
        ids = tl.where(koffs == j, i, ids)
        choice = tl.where(offs == i, float("-inf"), choice)
    if RENORM:
        weights = weights / (tl.sum(weights, 0) + 1e-20)
    shared = koffs >= TOP_K
    weights = tl.where(shared, 1.0, weights * scale)
    ids = tl.where(shared, shared_first + koffs - TOP_K, ids)
    kmask = koffs < TOP_K + N_SHARED
    tl.store(weights_ptr + t * (TOP_K + N_SHARED) + koffs, weights, mask=kmask)
    tl.store(ids_ptr + t * (TOP_K + N_SHARED) + koffs, ids, mask=kmask)


def moe_route_triton(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    group_mode: int,
    softmax: bool,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    n_shared: int = 0,
    shared_first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch one program per row; `group_mode` is GROUP_NONE, GROUP_MAX or GROUP_TOP2."""
    t, e = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    weights = torch.empty(t, top_k + n_shared, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k + n_shared, dtype=torch.int32, device=logits.device)
    if t == 0:
        return weights, ids
    _route_kernel[(t,)](
        logits,
        bias if bias is not None else logits,
        weights,
        ids,
        logits.stride(0),
        e,
        e // max(n_group, 1),
        float(routed_scaling_factor),
        shared_first,
        HAS_BIAS=bias is not None,
        SOFTMAX=softmax,
        GROUP_MODE=group_mode if n_group > 1 else GROUP_NONE,
        N_GROUP=n_group,
        TOPK_GROUP=topk_group,
        TOP_K=top_k,
        N_SHARED=n_shared,
        RENORM=norm_topk_prob and top_k > 1,
        BLOCK_E=triton.next_power_of_2(e),
        BLOCK_G=triton.next_power_of_2(max(n_group, 2)),
        BLOCK_K=triton.next_power_of_2(max(top_k + n_shared, 2)),
    )
    return weights, ids
