"""dsworker::moe_route against the engine's routing (model/routing.py), transformers' V3 router,
and its Triton kernel in the interpreter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fused_op_helpers import DEVICE, ODD_ROWS, kernels, preset_args

from dsworker.model.config import ModelArgs
from dsworker.model.routing import route
from dsworker.ops.routing import group_mode, moe_route, router_logits

# R1: 256 experts in 8 groups, the best 4 groups, 8 experts per token.
R1 = {"n_routed_experts": 256, "n_group": 8, "topk_group": 4, "top_k": 8}


def _cases() -> dict[str, ModelArgs]:
    tiny = preset_args("tiny")
    return {
        "v3-tiny": tiny,
        "v3-small": preset_args("small"),
        "v3-bench": preset_args("bench"),
        "v3-r1": dataclasses.replace(preset_args("bench"), **R1),
        "v2-greedy": preset_args("small", "v2"),
        "v2-group-limited": dataclasses.replace(
            preset_args("bench", "v2"), n_group=8, topk_group=3, topk_method="group_limited_greedy"
        ),
        "v3-no-renorm": dataclasses.replace(tiny, norm_topk_prob=False),
    }


CASES = _cases()


def _inputs(args: ModelArgs, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, args.n_routed_experts, generator=g)
    bias = 0.1 * torch.randn(args.n_routed_experts, generator=g)
    return logits, bias if args.topk_method == "noaux_tc" else None


def _op(args: ModelArgs, logits: torch.Tensor, bias: torch.Tensor | None, *shared: int):
    return moe_route(logits, bias, args.top_k, args.n_group, args.topk_group, args.topk_method,
                     args.scoring_func, args.norm_topk_prob, args.routed_scaling_factor,
                     *shared)  # fmt: skip


def _assert_same_routing(w, ids, ref_w, ref_ids) -> None:
    """Same expert set per row and the same weight for each expert (order is free)."""
    ids_sorted, order = ids.long().sort(dim=-1)
    ref_sorted, ref_order = ref_ids.long().sort(dim=-1)
    assert torch.equal(ids_sorted, ref_sorted)
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_equals_engine_routing(case: str) -> None:
    args = CASES[case]
    logits, bias = _inputs(args, 64, 0)
    w, ids = _op(args, logits, bias)
    ref_w, ref_ids = route(logits, args, bias)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    _assert_same_routing(w, ids, ref_w, ref_ids)


def test_reference_equals_transformers_router() -> None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(
        hidden_size=64, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=3
    )
    router = DeepseekV3TopkRouter(cfg)
    torch.manual_seed(1)
    router.weight.data.normal_()
    router.e_score_correction_bias.normal_(std=0.1)
    x = torch.randn(17, 64)
    logits, hf_w, hf_ids = router(x)
    w, ids = moe_route(logits, router.e_score_correction_bias, 6, 8, 3, "noaux_tc", "sigmoid",
                       cfg.norm_topk_prob, cfg.routed_scaling_factor)  # fmt: skip
    _assert_same_routing(w, ids, hf_w, hf_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_equals_reference(case: str, dtype: torch.dtype) -> None:
    args = CASES[case]
    k = kernels("routing")
    for rows in ODD_ROWS:
        logits, bias = _inputs(args, rows, rows)
        logits = logits.to(dtype).to(DEVICE)
        bias = bias.to(DEVICE) if bias is not None else None
        ref_w, ref_ids = _op(args, logits.cpu(), bias.cpu() if bias is not None else None)
        w, ids = k.moe_route_triton(
            logits,
            bias,
            args.top_k,
            args.n_group,
            args.topk_group,
            group_mode(args.topk_method),
            args.scoring_func == "softmax",
            args.norm_topk_prob,
            args.routed_scaling_factor,
        )
        _assert_same_routing(w.cpu(), ids.cpu(), ref_w, ref_ids)


def test_bad_method_is_named() -> None:
    with pytest.raises(ValueError, match="topk_method 'aux'"):
        moe_route(torch.zeros(1, 8), None, 2, 1, 1, "aux", "sigmoid", True, 1.0)


def test_opcheck() -> None:
    args = CASES["v3-small"]
    logits, bias = _inputs(args, 5, 0)
    torch.library.opcheck(
        torch.ops.dsworker.moe_route.default,
        (logits, bias, args.top_k, args.n_group, args.topk_group, "noaux_tc", "sigmoid", True, 2.5),
    )


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy", "greedy"])
def test_zero_rows(method: str) -> None:
    """A rank with no tokens in an EP step still routes (an empty [0, k] answer, no error)."""
    w, ids = moe_route(torch.zeros(0, 16), torch.zeros(16), 2, 4, 2, method, "sigmoid", True, 1.0)
    assert w.shape == (0, 2) and w.dtype == torch.float32
    assert ids.shape == (0, 2) and ids.dtype == torch.int32


def test_router_logits_are_fp32_of_fp32_operands() -> None:
    """transformers' router: both operands up-cast, fp32 logits; the up-cast stays in the op."""
    x = torch.randn(3, 64).to(torch.bfloat16)
    gate = torch.randn(16, 64)
    out = router_logits(x, gate)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.nn.functional.linear(x.float(), gate))
    assert router_logits(x[:0], gate).shape == (0, 16)
    torch.library.opcheck(torch.ops.dsworker.router_logits.default, (x, gate))


def _assert_shared_columns(w, ids, k: int, n_shared: int, first: int) -> None:
    assert w.shape == ids.shape == (w.shape[0], k + n_shared)
    assert torch.equal(w[:, k:], torch.ones(w.shape[0], n_shared))
    want = torch.arange(first, first + n_shared, dtype=torch.int32).expand(w.shape[0], -1)
    assert torch.equal(ids[:, k:], want)


@pytest.mark.parametrize("case", ["v3-tiny", "v3-small", "v2-greedy", "v3-r1"])
def test_shared_columns_follow_the_routed_ones(case: str) -> None:
    """n_shared appends always-selected columns (ids shared_first.., weight 1); the routed
    columns are unchanged, so the renormalisation never sees the shared ones."""
    args = CASES[case]
    for rows in (0, *ODD_ROWS):
        logits, bias = _inputs(args, rows, rows)
        w, ids = _op(args, logits, bias)
        ws, ids_s = _op(args, logits, bias, 2, args.n_routed_experts)
        assert torch.equal(ws[:, : args.top_k], w) and torch.equal(ids_s[:, : args.top_k], ids)
        _assert_shared_columns(ws, ids_s, args.top_k, 2, args.n_routed_experts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["v3-tiny", "v3-small", "v2-greedy", "v3-no-renorm"])
def test_triton_shared_columns_equal_reference(case: str, dtype: torch.dtype) -> None:
    args = CASES[case]
    k = kernels("routing")
    for rows, n_shared in zip(ODD_ROWS, (1, 2, 3), strict=True):
        logits, bias = _inputs(args, rows, rows)
        logits = logits.to(dtype).to(DEVICE)
        bias = bias.to(DEVICE) if bias is not None else None
        first = 5 * rows  # any id: a rank's first shared slot follows its own experts
        ref_w, ref_ids = _op(args, logits.cpu(), bias.cpu() if bias is not None else None,
                             n_shared, first)  # fmt: skip
        w, ids = k.moe_route_triton(logits, bias, args.top_k, args.n_group, args.topk_group,
                                    group_mode(args.topk_method), args.scoring_func == "softmax",
                                    args.norm_topk_prob, args.routed_scaling_factor, n_shared,
                                    first)  # fmt: skip
        top = args.top_k
        _assert_same_routing(w[:, :top].cpu(), ids[:, :top].cpu(), ref_w[:, :top], ref_ids[:, :top])
        _assert_shared_columns(w.cpu(), ids.cpu(), top, n_shared, first)


def test_shared_opcheck_and_bad_counts() -> None:
    args = CASES["v3-small"]
    logits, bias = _inputs(args, 5, 0)
    torch.library.opcheck(
        torch.ops.dsworker.moe_route.default,
        (logits, bias, args.top_k, args.n_group, args.topk_group, "noaux_tc", "sigmoid", True,
         2.5, 2, 32),
    )  # fmt: skip
    with pytest.raises(ValueError, match="n_shared and shared_first must be >= 0"):
        _op(args, logits, bias, -1, 0)
