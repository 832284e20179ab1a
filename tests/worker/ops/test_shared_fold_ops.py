"""The shared experts as extra experts of the routed stack (model/shared_fold.py), at the ops:
the fused ops over routed + shared columns equal the routed ops plus the shared slice's own MLP,
for BF16 (reference and Triton in the interpreter) and the 8-bit formats that fold."""

from __future__ import annotations

import pytest
import torch
from fused_op_helpers import DEVICE, ODD_ROWS, assert_close, kernels, preset_args

from dsworker.contract.quant import FP8, W8A8, W8A16, QuantFormat
from dsworker.model.experts import LocalExperts
from dsworker.model.layers import MLP
from dsworker.model.shared_fold import FoldedShared
from dsworker.ops.moe_experts import moe_down, moe_gate_up

CPU = torch.device("cpu")
ULPS = {torch.float32: 64, torch.bfloat16: 8}  # bf16: the separate sum rounds twice more


def _routing(rows: int, num: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num, generator=g)[:k] for _ in range(rows)])
    ids[0, -1] = -1  # an expert of another rank
    return ids, torch.rand(rows, k, generator=g)


def _with_shared(ids: torch.Tensor, w: torch.Tensor, first: int, chunks: int):  # noqa: ANN202
    """What moe_route appends: columns first.. with weight 1."""
    extra = torch.arange(first, first + chunks).expand(ids.shape[0], chunks)
    return torch.cat([ids, extra], 1), torch.cat([w, torch.ones(ids.shape[0], chunks)], 1)


def _slice_mlp(ex: LocalExperts, chunks: int, dtype: torch.dtype) -> MLP:
    """The un-chunked slice the chunks cut: gate rows, up rows and down columns re-joined."""
    e, i, h = ex.num, ex.inter, ex.all13.shape[-1]
    mlp = MLP(h, chunks * i, dtype, CPU)
    gate = ex.all13[e:, :i].reshape(chunks * i, h)
    up = ex.all13[e:, i:].reshape(chunks * i, h)
    mlp.w13.copy_(torch.cat([gate, up]))
    mlp.w2.copy_(ex.all2[e:].transpose(0, 1).reshape(h, chunks * i))
    return mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("preset", "chunks"), [("tiny", 2), ("small", 1), ("small", 2)])
def test_fused_shared_columns_equal_routed_plus_shared_mlp(
    preset: str, chunks: int, dtype: torch.dtype
) -> None:
    args = preset_args(preset)
    h, inter, k = args.hidden_size, args.moe_intermediate_size, args.top_k
    ex = LocalExperts(args.n_routed_experts, 0, h, inter, dtype, CPU, extra=chunks)
    g = torch.Generator().manual_seed(chunks)
    ex.all13.copy_(torch.randn(ex.all13.shape, generator=g) * h**-0.5)
    ex.all2.copy_(torch.randn(ex.all2.shape, generator=g) * inter**-0.5)
    shared, plain = FoldedShared(ex, chunks, h, dtype), _slice_mlp(ex, chunks, dtype)
    tk = kernels("moe_experts")
    for rows in ODD_ROWS:
        ids, w = _routing(rows, ex.num, k, rows)
        all_ids, all_w = _with_shared(ids, w, ex.num, chunks)
        x = torch.randn(rows, h, generator=g).to(dtype)
        folded = ex.fused(x, all_ids, all_w)
        want = (ex.fused(x, ids, w).float() + plain(x).float()).to(dtype)
        assert_close(folded, want, ULPS[dtype])
        assert_close(shared(x), plain(x), ULPS[dtype])  # the prefill path's chunk sum
        hidden = moe_gate_up(x, all_ids, ex.all13)
        got = tk.moe_gate_up_triton(x.to(DEVICE), all_ids.to(DEVICE), ex.all13.to(DEVICE), 128)
        assert_close(got.cpu(), hidden, 4)
        got = tk.moe_down_triton(hidden.to(DEVICE), all_ids.to(DEVICE), all_w.to(DEVICE),
                                 ex.all2.to(DEVICE), 128)  # fmt: skip
        assert_close(got.cpu(), moe_down(hidden, all_ids, all_w, ex.all2), 4)


def _fill_quant(ex: LocalExperts, seed: int) -> None:
    """Random codes and positive scales in the stacks (routed and shared alike)."""
    g = torch.Generator().manual_seed(seed)
    for qw in (ex.qall13, ex.qall2):
        if qw.kind == FP8:
            qw.data.copy_((torch.randn(qw.data.shape, generator=g) * 2).to(torch.float8_e4m3fn))
        else:
            qw.data.copy_(torch.randint(-127, 128, qw.data.shape, generator=g).to(torch.int8))
        qw.scale.copy_(torch.rand(qw.scale.shape, generator=g) * 0.02 + 0.005)
        if qw.offset is not None:
            qw.offset.copy_(torch.randint(-3, 4, qw.offset.shape, generator=g).float())


FORMATS = {
    "fp8-2": (QuantFormat(FP8), 2),
    "fp8-1": (QuantFormat(FP8), 1),
    "w8a8-1": (QuantFormat(W8A8), 1),
    "w8a16-1": (QuantFormat(W8A16), 1),
    "w8a16-group-2": (QuantFormat(W8A16, group_size=64), 2),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_quant_fused_shared_columns_equal_the_separate_mlp(name: str) -> None:
    """8-bit stacks: the grouped ops over routed + shared columns equal the grouped ops over the
    routed ones plus the chunk MLPs (quant_linear), on the same stored bytes."""
    fmt, chunks = FORMATS[name]
    h, inter, num, k = 256, 128, 4, 2  # whole 128-blocks per chunk for FP8
    ex = LocalExperts(num, 0, h, inter, torch.float32, CPU, (fmt, fmt), extra=chunks)
    _fill_quant(ex, chunks)
    shared = FoldedShared(ex, chunks, h, torch.float32)
    for rows in ODD_ROWS:
        ids, w = _routing(rows, num, k, rows)
        all_ids, all_w = _with_shared(ids, w, num, chunks)
        x = torch.randn(rows, h)
        folded = ex.fused(x, all_ids, all_w)
        want = ex.fused(x, ids, w) + shared(x)
        assert_close(folded, want, 64)
        assert float(shared(x).abs().max()) > 0  # the shared part is there to be compared
