"""Quantised routed-expert ops (references) against float64 pair-by-pair expert matmuls.

Shapes are odd on purpose: H = 200 and INTER = 96 are not multiples of 128 (FP8 w13 then has gate and up
blocks apart), ids include -1 (expert on another rank). Tolerance relative to the largest output:
2e-5 for fp32 inputs. W8A8's down input is quantised from the op's own gate_up output (as the
model does), so its truth starts from the same h.
"""

from __future__ import annotations

import pytest
import torch
from quant_helpers import expert_stack, moe_truth, rel_err, tail

import dsworker.ops  # noqa: F401  (registers the dsworker:: ops)
from dsworker.ops import quant_formats as qf
from dsworker.ops.quant_moe import DOWN, GATE_UP, quant_experts

E, H, INTER, T, K = 4, 200, 96, 6, 3


def _routing(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    ids = torch.randint(-1, E, (T, K), generator=gen)
    ids[0] = -1  # a token with no local expert
    ids[1] = torch.tensor([2, 2, 0])  # the same expert twice
    return x, ids, torch.rand(T, K, generator=gen)


@pytest.mark.parametrize("kind", qf.KINDS)
def test_gate_up_and_down_match_float64(kind: str) -> None:
    x, ids, wts = _routing(1)
    w13 = expert_stack(kind, E, 2 * INTER, H, True, 2)
    w2 = expert_stack(kind, E, H, INTER, False, 3)
    h = GATE_UP[kind](x, ids, w13["data"], w13["scale"], *tail(kind, w13))
    assert h.shape == (T, K, INTER) and not h[0].any()
    h_true, _ = moe_truth(kind, x, ids, wts, w13, w2)
    assert rel_err(h, h_true) < 2e-5
    out = DOWN[kind](h, ids, wts, w2["data"], w2["scale"], *tail(kind, w2))
    _, out_true = moe_truth(kind, x, ids, wts, w13, w2)
    if kind == "w8a8":  # the down input is the op's own h, quantised per (token, k) row
        out_true = _down_from(kind, h, ids, wts, w2)
    assert out.shape == (T, H) and not out[0].any()
    assert rel_err(out, out_true) < 2e-5


def _down_from(
    kind: str, h: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, w2: dict
) -> torch.Tensor:
    from quant_helpers import w8a8_input

    hin = w8a8_input(h.reshape(T * K, INTER)).view(T, K, INTER)
    out = torch.zeros(T, H, dtype=torch.float64)
    for a in range(T):
        for b in range(K):
            if ids[a, b] >= 0:
                out[a] += float(wts[a, b]) * (w2["dense"][int(ids[a, b])] @ hin[a, b])
    return out


def test_bf16_inputs_and_quant_experts() -> None:
    x, ids, wts = _routing(4)
    w13 = expert_stack("fp8", E, 2 * INTER, H, True, 5)
    w2 = expert_stack("fp8", E, H, INTER, False, 6)
    q13 = qf.QuantWeight(qf.FP8, w13["data"], w13["scale"])
    q2 = qf.QuantWeight(qf.FP8, w2["data"], w2["scale"])
    out = quant_experts(x.bfloat16(), ids, wts, q13, q2)
    assert out.dtype == torch.bfloat16
    _, out_true = moe_truth("fp8", x.bfloat16(), ids, wts, w13, w2)
    assert rel_err(out, out_true) < 2e-2  # h is rounded to bf16 between the two ops


def test_bad_ids_shape_is_named() -> None:
    x, ids, _ = _routing(7)
    w13 = expert_stack("w8a16", E, 2 * INTER, H, True, 8)
    with pytest.raises(ValueError, match="topk_ids"):
        GATE_UP["w8a16"](x, ids[:2], w13["data"], w13["scale"], 32)


@pytest.mark.parametrize("kind", qf.KINDS)
def test_opcheck_moe_ops(kind: str) -> None:
    x, ids, wts = _routing(9)
    w13 = expert_stack(kind, E, 2 * INTER, H, True, 10)
    w2 = expert_stack(kind, E, H, INTER, False, 11)
    h = torch.randn(T, K, INTER)
    utils = ("test_faketensor", "test_aot_dispatch_dynamic")
    if kind != "fp8":  # test_schema compares with ops float8 lacks on CPU
        utils = ("test_schema", "test_autograd_registration", *utils)
    gu = (x, ids, w13["data"], w13["scale"], *tail(kind, w13))
    torch.library.opcheck(GATE_UP[kind]._opoverload, gu, test_utils=utils)
    dn = (h, ids, wts, w2["data"], w2["scale"], *tail(kind, w2))
    torch.library.opcheck(DOWN[kind]._opoverload, dn, test_utils=utils)
