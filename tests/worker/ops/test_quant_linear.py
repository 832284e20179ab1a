"""Dense quantised ops (reference implementations) against float64 matmuls of the dequantised weights.

Tolerances, relative to the largest output: fp32 x 2e-5 (fp32 accumulation over K <= 300);
bf16 x 8e-3 (one bf16 rounding of the output, 2**-8, plus accumulation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quant_helpers import dequant_fp8, dequant_int8, quant_fp8, quant_int8, rel_err, w8a8_input

import dsworker.ops  # noqa: F401  (registers the dsworker:: ops)
from dsworker.checkpoint.number_formats import pack_int8_to_int32
from dsworker.ops import quant_formats as qf
from dsworker.ops import quant_matmul
from dsworker.ops.quant_matmul import quant_linear

TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}
SHAPES = [(1, 200, 300), (3, 128, 256), (17, 77, 130)]


def _x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m * 31 + k)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_fp8_block_linear(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    q, s = quant_fp8(torch.randn(n, k))
    x = _x(m, k, dtype)
    y = torch.ops.dsworker.fp8_block_linear(x, q, s, 128, 128)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, x.double() @ dequant_fp8(q, s).T) < TOL[dtype]


@pytest.mark.parametrize("group", [0, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_w8a16_linear(m: int, n: int, k: int, dtype: torch.dtype, group: int) -> None:
    q, s = quant_int8(torch.randn(n, k), group)
    x = _x(m, k, dtype)
    y = torch.ops.dsworker.w8a16_linear(x, q, s, group)
    assert rel_err(y, x.double() @ dequant_int8(q, s, group=group).T) < TOL[dtype]


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_w8a8_linear(m: int, n: int, k: int, dtype: torch.dtype, with_offset: bool) -> None:
    q, s = quant_int8(torch.randn(n, k))
    off = torch.randint(-4, 5, (n, 1)).float() if with_offset else None
    x = _x(m, k, dtype)
    y = torch.ops.dsworker.w8a8_linear(x, q, s, off)
    assert rel_err(y, w8a8_input(x) @ dequant_int8(q, s, off).T) < TOL[dtype]


def test_w8a8_exact_int32_accumulation_at_r1_width() -> None:
    """K = 7168 with saturated codes: int8 products summed in fp32 would lose bits past 2**24."""
    q = torch.full((4, 7168), -127, dtype=torch.int8)
    x = torch.full((2, 7168), -1.0)
    y = torch.ops.dsworker.w8a8_linear(x, q, torch.ones(4, 1), None)
    assert torch.equal(y, torch.full((2, 4), 127.0 * 127.0 * 7168 / 127.0))


def test_per_token_quantisation_error_is_half_a_step() -> None:
    x = torch.randn(9, 300) * torch.logspace(-3, 3, 9)[:, None]
    xq, xs = qf.quantize_per_token(x)
    assert xq.abs().max() == 127
    assert ((xq.float() * xs[:, None] - x).abs() <= xs[:, None] * 0.5 * (1 + 1e-5)).all()
    zq, zs = qf.quantize_per_token(torch.zeros(2, 8))
    assert not zq.any() and torch.equal(zs, torch.ones(2))


@pytest.mark.parametrize("kind", qf.KINDS)
def test_tiles_do_not_change_results(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 64 rows (crossing FP8 block edges) give the single-tile answer."""
    w = torch.randn(300, 256)
    q, s = quant_fp8(w) if kind == qf.FP8 else quant_int8(w)
    qw = qf.QuantWeight(kind, q, s)
    x = _x(5, 256, torch.float32)
    whole = quant_linear(x, qw)
    monkeypatch.setattr(quant_matmul, "TILE_ROWS", 64)
    assert torch.equal(quant_linear(x, qw), whole)


def test_quant_linear_keeps_leading_dims() -> None:
    q, s = quant_int8(torch.randn(40, 64), 32)
    qw = qf.QuantWeight(qf.W8A16, q, s, group_size=32)
    x = torch.randn(2, 3, 64)
    y = quant_linear(x, qw)
    assert y.shape == (2, 3, 40)
    assert rel_err(y, x.double() @ dequant_int8(q, s, group=32).T) < TOL[torch.float32]


def test_nbytes_equal_checkpoint_bytes() -> None:
    w = torch.randn(256, 384)
    q8, s8 = quant_fp8(w)
    fp8 = qf.from_checkpoint(qf.FP8, {"weight": q8, "weight_scale_inv": s8})
    assert fp8.nbytes == 256 * 384 + s8.numel() * 4

    qi, si = quant_int8(w)
    off = torch.randint(-3, 4, (256, 1)).float()
    w8a8 = qf.from_checkpoint(qf.W8A8, {"weight": qi, "weight_scale": si, "weight_offset": off})
    assert w8a8.nbytes == qi.nbytes + si.nbytes + off.nbytes

    qg, sg = quant_int8(w, 128)
    packed = torch.from_numpy(pack_int8_to_int32(qg.numpy()))
    shape = torch.tensor([256, 384], dtype=torch.int32)
    ckpt = {"weight_packed": packed, "weight_scale": sg, "weight_shape": shape}
    w8a16 = qf.from_checkpoint(qf.W8A16, ckpt)
    assert torch.equal(w8a16.data, qg) and w8a16.group_size == 128
    assert w8a16.nbytes == packed.nbytes + sg.nbytes


def test_w8a16_unpack_matches_checkpoint_packing() -> None:
    q = torch.randint(-128, 128, (5, 12), dtype=torch.int8)
    packed = torch.from_numpy(np.ascontiguousarray(pack_int8_to_int32(q.numpy())))
    assert torch.equal(qf.unpack_w8a16(packed, 12), q)
    assert torch.equal(qf.unpack_w8a16(packed, 10), q[:, :10])


def test_bad_scales_are_named() -> None:
    q, s = quant_fp8(torch.randn(256, 256))
    with pytest.raises(ValueError, match="weight_scale_inv"):
        qf.QuantWeight(qf.FP8, q, s[:1])
    qi, si = quant_int8(torch.randn(8, 64), 16)
    with pytest.raises(ValueError, match="group_size"):
        qf.QuantWeight(qf.W8A16, qi, si, group_size=32)
    with pytest.raises(ValueError, match="x must be"):
        torch.ops.dsworker.w8a16_linear(torch.randn(2, 63), qi, si, 16)


def test_opcheck_dense_ops() -> None:
    x = torch.randn(3, 130)
    q8, s8 = quant_fp8(torch.randn(70, 130))
    qi, si = quant_int8(torch.randn(70, 130), 0)
    qg, sg = quant_int8(torch.randn(70, 130), 32)
    off = torch.randint(-2, 3, (70, 1)).float()
    cases = [
        (torch.ops.dsworker.fp8_block_linear.default, (x, q8, s8, 128, 128)),
        (torch.ops.dsworker.w8a16_linear.default, (x, qg, sg, 32)),
        (torch.ops.dsworker.w8a8_linear.default, (x, qi, si, off)),
        (torch.ops.dsworker.w8a8_linear.default, (x, qi, si, None)),
    ]
    for op, args in cases:
        # test_schema compares outputs with ops float8 lacks on CPU; the fake and dispatch checks run
        utils = ("test_faketensor", "test_aot_dispatch_dynamic")
        if args[1].dtype == torch.int8:
            utils = ("test_schema", "test_autograd_registration", *utils)
        torch.library.opcheck(op, args, test_utils=utils)


def _static_expected(x: torch.Tensor, q: torch.Tensor, deq: torch.Tensor, sc: float, off: float,
                     qb: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """float64: (clamp(rint(x * (1 / scale) + offset)) @ q.T + quant_bias) * deq_scale."""
    v = x.double() * (1.0 / np.float32(sc)) + off
    xq = torch.clamp(torch.round(v), -128, 127)
    acc = xq @ q.double().T + (qb.double() if qb is not None else 0.0)
    return acc * deq.double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_w8a8_static_linear(m: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> None:
    q, s = quant_int8(torch.randn(n, k))
    deq = s.reshape(n).float() * 0.02
    qb = torch.randint(-3000, 3000, (n,), dtype=torch.int32) if bias else None
    x = _x(m, k, dtype) * 2
    sc, off = torch.tensor([0.02], dtype=torch.bfloat16), torch.tensor([-3.0])
    y = torch.ops.dsworker.w8a8_static_linear(x, q, deq, sc, off, qb)
    assert y.dtype == dtype and y.shape == (m, n)
    want = _static_expected(x.float(), q, deq, float(sc.float()), -3.0, qb)
    assert rel_err(y, want) < TOL[dtype]


def test_w8a8_static_saturates_rounds_to_even_and_sums_exactly_at_r1_width() -> None:
    """K = 7168 saturated at -128 (past 2**24 in fp32 sums); ties round to even."""
    q = torch.full((2, 7168), -127, dtype=torch.int8)
    x = torch.full((1, 7168), -1e6)
    one = torch.ones(1)
    y = torch.ops.dsworker.w8a8_static_linear(x, q, torch.ones(2), one, torch.zeros(1), None)
    assert torch.equal(y, torch.full((1, 2), float(128 * 127 * 7168)))
    ties = torch.tensor([[0.5, 1.5, 2.5, -2.5]])
    assert qf.quantize_static(ties, one, torch.zeros(1)).tolist() == [[0, 2, 2, -2]]


def test_unpack_deq_scale_reads_msmodelslims_int64_packing_and_refuses_others() -> None:
    """deqscale2int64 (np.frombuffer(float32 bytes, int32).astype(int64)) unpacks exactly; a
    high word set, a cast by value, a negative or non-finite scale is refused."""
    scale = np.array([1.5e-3, 2.0e-2, 0.0, 7.25e-5], dtype=np.float32)
    packed = torch.from_numpy(np.frombuffer(scale.tobytes(), dtype=np.int32).astype(np.int64))
    assert torch.equal(qf.unpack_deq_scale(packed), torch.from_numpy(scale))
    with pytest.raises(ValueError, match="high 32 bits set"):
        qf.unpack_deq_scale(packed | (1 << 40))
    bad = {
        "by value": torch.from_numpy(scale).to(torch.int64),  # all zero
        "negative": torch.from_numpy((-scale).view(np.int32).astype(np.int64)) & 0xFFFFFFFF,
        "infinite": torch.tensor([np.float32(np.inf).view(np.int32)], dtype=torch.int64),
    }
    for t in bad.values():
        with pytest.raises(ValueError, match="not finite, positive and normal"):
            qf.unpack_deq_scale(t)
    with pytest.raises(ValueError, match="int64"):
        qf.unpack_deq_scale(torch.zeros(2, dtype=torch.int32))
