"""`dsworker::moe_route`: router logits -> (top-k weights fp32, expert ids int32) in one op.

One op does what model/routing.py spreads over sigmoid/softmax, topk, scatter, gather and division:
score, add the correction bias (noaux_tc only; it steers the choice, the weights stay unbiased),
keep the best groups, take the top k, renormalise, scale. Every rank routing the same token gets
the same experts, so the op needs no collective and is the same at every world size.
`n_shared` > 0 appends that many always-selected columns (ids shared_first.., weight 1): the shared
experts, held as extra experts of the routed stack, then run inside the same fused expert ops.
"""

import torch
import torch.nn.functional as F

from dsworker.ops import backends, npu_fused, quant_npu

TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
SCORE_FUNCS = ("sigmoid", "softmax")


def _check(top_k: int, n_group: int, topk_group: int, topk_method: str, score_func: str) -> None:
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"moe_route: topk_method {topk_method!r} is not one of {TOPK_METHODS}")
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"moe_route: score_func {score_func!r} is not one of {SCORE_FUNCS}")
    if n_group < 1 or not 1 <= topk_group <= n_group or top_k < 1:
        raise ValueError(
            f"moe_route: need top_k >= 1 and 1 <= topk_group <= n_group, got top_k={top_k}, "
            f"n_group={n_group}, topk_group={topk_group}"
        )


def _check_shared(n_shared: int, shared_first: int) -> None:
    if n_shared < 0 or shared_first < 0:
        raise ValueError(
            f"moe_route: n_shared and shared_first must be >= 0, got {n_shared}, {shared_first}"
        )


def append_shared(
    weights: torch.Tensor, ids: torch.Tensor, n_shared: int, shared_first: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) [T, k] -> [T, k + n_shared]: the shared columns, ids shared_first.. and
    weight 1, after the routed ones."""
    if not n_shared:
        return weights, ids
    t = ids.shape[0]
    extra = torch.arange(shared_first, shared_first + n_shared, dtype=ids.dtype, device=ids.device)
    return (
        torch.cat([weights, weights.new_ones(t, n_shared)], 1),
        torch.cat([ids, extra.expand(t, n_shared)], 1),
    )


def _keep_top_groups(choice: torch.Tensor, group_score: torch.Tensor, keep: int) -> torch.Tensor:
    """-inf outside the `keep` best groups of each row."""
    top = group_score.topk(keep, dim=-1).indices
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, top, True)
    per = choice.shape[1] // group_score.shape[1]
    return choice.masked_fill(~allowed.repeat_interleave(per, dim=1), float("-inf"))


def route_reference(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    topk_method: str,
    score_func: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    n_shared: int = 0,
    shared_first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference: model/routing.py's math in fp32, ids as int32."""
    _check(top_k, n_group, topk_group, topk_method, score_func)
    _check_shared(n_shared, shared_first)
    x = logits.float()
    if x.shape[0] == 0:  # a rank with no tokens this step (an EP exchange still calls it)
        cols = top_k + n_shared
        return x.new_empty(0, cols), torch.empty(0, cols, dtype=torch.int32, device=x.device)
    scores = x.sigmoid() if score_func == "sigmoid" else x.softmax(dim=-1)
    choice = scores
    if topk_method == "noaux_tc" and bias is not None:
        choice = scores + bias.float()
    if topk_method != "greedy" and n_group > 1:
        per = choice.view(choice.shape[0], n_group, -1)
        if topk_method == "noaux_tc":
            group_score = per.topk(2, dim=-1).values.sum(-1)
        else:
            group_score = per.amax(-1)
        choice = _keep_top_groups(choice, group_score, topk_group)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return append_shared(
        weights * routed_scaling_factor, ids.to(torch.int32), n_shared, shared_first
    )


@torch.library.custom_op("dsworker::moe_route", mutates_args=())
def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    topk_method: str,
    score_func: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    n_shared: int = 0,
    shared_first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype), bias [E] or None -> (weights [T, k+S] fp32, ids [T, k+S]
    int32), S = n_shared (the appended shared columns, see the module docstring).

    topk_method: noaux_tc (V3: bias, groups scored by their top-2 sum), group_limited_greedy
    (V2: groups scored by their max), greedy (no groups). The bias is read only by noaux_tc.
    """
    return route_reference(logits, bias, top_k, n_group, topk_group, topk_method, score_func,
                           norm_topk_prob, routed_scaling_factor, n_shared, shared_first)  # fmt: skip


@moe_route.register_fake
def _moe_route_fake(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    topk_method: str,
    score_func: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    n_shared: int = 0,
    shared_first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    t, cols = logits.shape[0], top_k + n_shared
    return (
        logits.new_empty(t, cols, dtype=torch.float32),
        logits.new_empty(t, cols, dtype=torch.int32),
    )


@torch.library.custom_op("dsworker::router_logits", mutates_args=())
def router_logits(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x [T, H] (activation dtype), gate [E, H] -> fp32 logits [T, E], as transformers' router
    computes them (both operands in fp32); the up-cast stays inside the op."""
    return F.linear(x.float(), gate.float())


@router_logits.register_fake
def _router_logits_fake(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], gate.shape[0], dtype=torch.float32)


def group_mode(topk_method: str) -> int:
    """The Triton kernel's group rule for a topk_method (0 none, 1 max, 2 top-2 sum)."""
    return {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}[topk_method]


if backends.triton_available():

    @moe_route.register_kernel("cuda")
    def _moe_route_cuda(
        logits: torch.Tensor,
        bias: torch.Tensor | None,
        top_k: int,
        n_group: int,
        topk_group: int,
        topk_method: str,
        score_func: str,
        norm_topk_prob: bool,
        routed_scaling_factor: float,
        n_shared: int = 0,
        shared_first: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from dsworker.ops.triton.routing import moe_route_triton

        _check(top_k, n_group, topk_group, topk_method, score_func)
        _check_shared(n_shared, shared_first)
        return moe_route_triton(logits, bias if topk_method == "noaux_tc" else None, top_k,
                                n_group, topk_group, group_mode(topk_method),
                                score_func == "softmax", norm_topk_prob, routed_scaling_factor,
                                n_shared, shared_first)  # fmt: skip


if backends.npu_available() and quant_npu.load():
    moe_route.register_kernel("npu")(npu_fused.moe_route_npu)
    router_logits.register_kernel("npu")(npu_fused.router_logits_npu)
