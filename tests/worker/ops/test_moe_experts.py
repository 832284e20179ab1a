"""dsworker::moe_gate_up / moe_down against LocalExperts (model/experts.py), transformers' V3
experts, and their Triton kernels in the interpreter."""

from __future__ import annotations

import pytest
import torch
from fused_op_helpers import DEVICE, ODD_ROWS, assert_close, kernels, preset_args

from dsworker.model.experts import LocalExperts
from dsworker.ops.moe_experts import moe_down, moe_gate_up

ULPS = {torch.float32: 64, torch.bfloat16: 4}


def _experts(num: int, hidden: int, inter: int, dtype: torch.dtype, seed: int) -> LocalExperts:
    g = torch.Generator().manual_seed(seed)
    ex = LocalExperts(num, 0, hidden, inter, dtype, torch.device("cpu"))
    ex.w13.data.copy_(torch.randn(ex.w13.shape, generator=g) * hidden**-0.5)
    ex.w2.data.copy_(torch.randn(ex.w2.shape, generator=g) * inter**-0.5)
    return ex


def _routing(rows: int, experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(rows)])
    return ids, torch.rand(rows, k, generator=g)


def _ops(x, ids, w, ex: LocalExperts) -> torch.Tensor:
    return moe_down(moe_gate_up(x, ids, ex.w13), ids, w, ex.w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_local_experts(dtype: torch.dtype) -> None:
    """The ops' rows equal LocalExperts' loop; their sum equals combine (the sync-free path)."""
    args = preset_args("small")
    ex = _experts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size, dtype, 0)
    ids, w = _routing(7, ex.num, args.top_k, 0)
    x = torch.randn(7, args.hidden_size).to(dtype)
    h = moe_gate_up(x, ids, ex.w13)
    rows = ex(x.repeat_interleave(args.top_k, 0), ids.reshape(-1), grouped=False)
    down = torch.stack([torch.nn.functional.linear(h[t, j], ex.w2[ids[t, j]])
                        for t in range(7) for j in range(args.top_k)])  # fmt: skip
    assert_close(down, rows, ULPS[dtype])
    assert_close(moe_down(h, ids, w, ex.w2), ex.combine(x, ids, w), ULPS[dtype])


def test_off_rank_slots_are_skipped() -> None:
    """-1 slots (experts of other ranks) contribute nothing, as EP's hit mask drops them."""
    ex = _experts(8, 64, 32, torch.float32, 1)
    ids, w = _routing(5, 16, 3, 1)  # global ids over 16 experts; this rank holds 0..7
    local = torch.where(ids < 8, ids, -1)
    x = torch.randn(5, 64)
    h = moe_gate_up(x, local, ex.w13)
    assert torch.equal(h[local < 0], torch.zeros_like(h[local < 0]))
    masked_w = torch.where(ids < 8, w, 0.0)
    expected = ex.combine_dense(x, ids.clamp(max=7), masked_w)
    assert_close(moe_down(h, local, w, ex.w2), expected, 64)


def test_reference_equals_transformers_experts() -> None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    cfg = DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8)
    hf = DeepseekV3Experts(cfg)
    ex = _experts(8, 64, 32, torch.float32, 2)
    hf.gate_up_proj.data.copy_(ex.w13)
    hf.down_proj.data.copy_(ex.w2)
    ids, w = _routing(5, 8, 3, 2)
    x = torch.randn(5, 64)
    assert_close(_ops(x, ids, w, ex), hf(x, ids, w), 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["tiny", "small", "bench"])
def test_triton_equals_reference(preset: str, dtype: torch.dtype) -> None:
    args = preset_args(preset)
    k = kernels("moe_experts")
    # The kernels read only routed experts, so bench dims need not allocate all 32 of them.
    num = args.n_routed_experts if preset != "bench" else args.top_k + 2
    ex = _experts(num, args.hidden_size, args.moe_intermediate_size, dtype, 3)
    block = {"tiny": 32, "small": 128, "bench": 256}[preset]  # wide: fewer interpreted programs
    for rows in ODD_ROWS if preset != "bench" else (1,):
        ids, w = _routing(rows, ex.num, args.top_k, rows)
        ids[0, -1] = -1  # an off-rank slot
        x = torch.randn(rows, args.hidden_size).to(dtype)
        h_ref = moe_gate_up(x, ids, ex.w13)
        h = k.moe_gate_up_triton(x.to(DEVICE), ids.to(DEVICE), ex.w13.to(DEVICE), block)
        assert_close(h.cpu(), h_ref, ULPS[dtype])
        out = k.moe_down_triton(
            h_ref.to(DEVICE), ids.to(DEVICE), w.to(DEVICE), ex.w2.to(DEVICE), block
        )
        assert_close(out.cpu(), moe_down(h_ref, ids, w, ex.w2), ULPS[dtype])


def test_bad_ids_are_named() -> None:
    ex = _experts(4, 16, 8, torch.float32, 4)
    with pytest.raises(ValueError, match=r"need \[-1, 4\)"):
        moe_gate_up(torch.randn(2, 16), torch.tensor([[0, 4], [1, 2]]), ex.w13)


def test_opcheck() -> None:
    ex = _experts(8, 64, 32, torch.bfloat16, 5)
    ids, w = _routing(3, 8, 2, 5)
    x = torch.randn(3, 64).bfloat16()
    torch.library.opcheck(torch.ops.dsworker.moe_gate_up.default, (x, ids, ex.w13))
    h = moe_gate_up(x, ids, ex.w13)
    torch.library.opcheck(torch.ops.dsworker.moe_down.default, (h, ids, w, ex.w2))
