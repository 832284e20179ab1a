"""Top-k expert selection: V3 noaux_tc (sigmoid + correction bias, group-limited) and V2 greedy.

All in fp32 like the reference implementations, so every rank that routes the same token picks the
same experts. The correction bias only steers the choice; weights are the unbiased scores.
"""

from __future__ import annotations

import torch

from dsworker.model.config import ModelArgs


def _keep_top_groups(choice: torch.Tensor, group_score: torch.Tensor, keep: int) -> torch.Tensor:
    """Mask (-inf) the experts outside the `keep` best groups of each token."""
    n, groups = group_score.shape
    top = group_score.topk(keep, dim=-1).indices
    allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, top, True)
    allowed = allowed[:, :, None].expand(n, groups, choice.shape[1] // groups)
    allowed = allowed.reshape(n, choice.shape[1])
    return choice.masked_fill(~allowed, float("-inf"))


def route(
    logits: torch.Tensor, args: ModelArgs, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [n, E] (fp32) -> (weights [n, k] fp32, expert ids [n, k] int64)."""
    k, groups = args.top_k, args.n_group
    if args.scoring_func == "sigmoid":
        scores = logits.sigmoid()
    elif args.scoring_func == "softmax":
        scores = logits.softmax(dim=-1)
    else:
        raise ValueError(f"scoring_func {args.scoring_func!r} is not supported (sigmoid, softmax)")
    if args.topk_method == "noaux_tc":
        choice = scores + bias if bias is not None else scores
        if groups > 1:
            per = choice.view(choice.shape[0], groups, choice.shape[1] // groups)
            choice = _keep_top_groups(choice, per.topk(2, dim=-1).values.sum(-1), args.topk_group)
        ids = choice.topk(k, dim=-1).indices
    elif args.topk_method == "group_limited_greedy":
        per = scores.view(scores.shape[0], groups, scores.shape[1] // groups)
        ids = _keep_top_groups(scores, per.amax(-1), args.topk_group).topk(k, dim=-1).indices
    elif args.topk_method == "greedy":
        ids = scores.topk(k, dim=-1).indices
    else:
        raise ValueError(f"topk_method {args.topk_method!r} is not supported")
    weights = scores.gather(1, ids)
    if args.norm_topk_prob and k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * args.routed_scaling_factor, ids
