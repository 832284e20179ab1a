"""Triton launcher cases, run by test_quant_triton.py in a child process under TRITON_INTERPRET=1.

Not collected on its own (no test_ prefix): the interpreter must be switched on before triton is
first imported (triton 3.9's own @jit helpers such as tl.sum and tl.sigmoid are decorated then, and
an interpreted kernel cannot call a compiled one), which only a fresh process guarantees. Sizes are
small: the interpreter runs every program in numpy. Tolerance relative to the largest output: fp32
inputs 2e-5; bf16 inputs 8e-3 (kernel and reference each round the output to bf16 once).
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pytest
import torch
from quant_helpers import expert_stack, quant_fp8, quant_int8, rel_err, tail

import dsworker.ops  # noqa: F401  (registers the dsworker:: ops)
from dsworker.ops import quant_formats as qf
from dsworker.ops.quant_moe import DOWN, GATE_UP

pytest.importorskip("triton", reason="triton is not installed")
KERNELS = ("dsworker.ops.triton.quant_matmul", "dsworker.ops.triton.quant_moe")
TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module")
def tk() -> SimpleNamespace:
    """The kernel modules, checked to be interpreted: `tk.mm` (dense) and `tk.moe` (experts)."""
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("run these cases through test_quant_triton.py (they need TRITON_INTERPRET=1)")
    mods = [importlib.import_module(n) for n in KERNELS]
    assert isinstance(mods[0]._wo_gemm_kernel, InterpretedFunction), "kernels are not interpreted"
    return SimpleNamespace(mm=mods[0], moe=mods[1])


def _x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)


@pytest.mark.parametrize(
    ("m", "dtype"), [(1, torch.float32), (17, torch.float32), (3, torch.bfloat16)]
)
def test_fp8_gemm(tk: SimpleNamespace, m: int, dtype: torch.dtype) -> None:
    q, s = quant_fp8(torch.randn(200, 300))
    x = _x(m, 300, dtype)
    got = tk.mm.fp8_block_linear(x, q, s, 128, 128)
    assert got.dtype == dtype
    assert rel_err(got, torch.ops.dsworker.fp8_block_linear(x, q, s, 128, 128)) < TOL[dtype]


@pytest.mark.parametrize(
    ("group", "m", "dtype"),
    [(0, 1, torch.float32), (32, 17, torch.float32), (64, 3, torch.bfloat16)],
)
def test_w8a16_gemm(tk: SimpleNamespace, group: int, m: int, dtype: torch.dtype) -> None:
    q, s = quant_int8(torch.randn(130, 300), group)
    x = _x(m, 300, dtype)
    got = tk.mm.w8a16_linear(x, q, s, group)
    assert rel_err(got, torch.ops.dsworker.w8a16_linear(x, q, s, group)) < TOL[dtype]


@pytest.mark.parametrize(
    ("offset", "m", "dtype"),
    [(False, 1, torch.float32), (True, 17, torch.float32), (True, 3, torch.bfloat16)],
)
def test_w8a8_gemm(tk: SimpleNamespace, offset: bool, m: int, dtype: torch.dtype) -> None:
    q, s = quant_int8(torch.randn(130, 300))
    off = torch.randint(-4, 5, (130, 1)).float() if offset else None
    x = _x(m, 300, dtype)
    got = tk.mm.w8a8_linear(x, q, s, off)
    assert rel_err(got, torch.ops.dsworker.w8a8_linear(x, q, s, off)) < TOL[dtype]


def test_per_token_quant_is_bit_exact(tk: SimpleNamespace) -> None:
    x = torch.randn(5, 1500) * torch.logspace(-2, 2, 5)[:, None]
    x[2] = 0
    q, s = tk.mm.per_token_quant(x)
    rq, rs = qf.quantize_per_token(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)


def test_align_by_expert(tk: SimpleNamespace) -> None:
    ids = torch.tensor([[3, -1], [0, 3], [3, 3], [-1, -1]])
    pairs, bexp = tk.moe.align_by_expert(ids, 5, 2)
    p = ids.numel()
    runs = pairs.view(-1, 2)
    for blk, e in enumerate(bexp.tolist()):
        got = [int(v) for v in runs[blk] if v < p]
        assert all(int(ids.view(-1)[v]) == e for v in got)
    seen = sorted(int(v) for v in pairs if v < p)
    assert seen == [i for i in range(p) if ids.view(-1)[i] >= 0]
    assert bexp.tolist()[:3] == [0, 3, 3] and set(bexp.tolist()[3:]) == {-1}


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [
        ("fp8", torch.float32),
        ("w8a16", torch.float32),
        ("w8a8", torch.float32),
        ("fp8", torch.bfloat16),
    ],
)
def test_moe_kernels(tk: SimpleNamespace, kind: str, dtype: torch.dtype) -> None:
    e, hid, inter, t, k = 4, 200, 96, 5, 3
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(t, hid, generator=gen).to(dtype)
    ids = torch.randint(-1, e, (t, k), generator=gen)
    ids[0] = -1
    wts = torch.rand(t, k, generator=gen)
    w13 = expert_stack(kind, e, 2 * inter, hid, True, 4)
    w2 = expert_stack(kind, e, hid, inter, False, 5)
    h = tk.moe.gate_up(kind, x, ids, w13["data"], w13["scale"], *tail(kind, w13))
    h_ref = GATE_UP[kind](x, ids, w13["data"], w13["scale"], *tail(kind, w13))
    assert h.shape == h_ref.shape and not h[0].any()
    assert rel_err(h, h_ref) < TOL[dtype]
    out = tk.moe.down(kind, h_ref, ids, wts, w2["data"], w2["scale"], *tail(kind, w2))
    out_ref = DOWN[kind](h_ref, ids, wts, w2["data"], w2["scale"], *tail(kind, w2))
    assert out.dtype == dtype and not out[0].any()
    assert rel_err(out, out_ref) < TOL[dtype]


@pytest.mark.parametrize(
    ("m", "n", "k", "dtype", "bias"),
    [(1, 130, 300, torch.float32, True), (17, 77, 130, torch.float32, False),
     (3, 64, 200, torch.bfloat16, True)],
)  # fmt: skip
def test_w8a8_static_gemm(m: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> None:
    ts = importlib.import_module("dsworker.ops.triton.quant_static")
    q, s = quant_int8(torch.randn(n, k))
    deq = (s.reshape(n) * 0.03).float()
    qb = torch.randint(-5000, 5000, (n,), dtype=torch.int32) if bias else None
    x = _x(m, k, dtype) * 2
    sc, off = torch.tensor([0.03], dtype=torch.bfloat16), torch.tensor([3.0], dtype=torch.bfloat16)
    got = ts.w8a8_static_linear(x, q, deq, sc, off, qb)
    assert got.dtype == dtype
    want = torch.ops.dsworker.w8a8_static_linear(x, q, deq, sc, off, qb)
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_static_quant_takes_the_reciprocal_in_xs_dtype_bit_for_bit(dtype: torch.dtype) -> None:
    """The kernel rounds the scale and its reciprocal to x's dtype as the reference does: with
    200 scales, one reciprocal off by a unit of x's dtype moves some of the quantised values."""
    ts = importlib.import_module("dsworker.ops.triton.quant_static")
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 300, generator=gen) * 2).to(dtype)
    for sc in (torch.rand(200, generator=gen) * 0.05 + 1e-3).tolist():
        s, o = torch.tensor([sc]), torch.tensor([2.0], dtype=torch.bfloat16)
        assert torch.equal(ts.static_quant(x, s, o), qf.quantize_static(x, s, o)), (dtype, sc)


def test_static_quant_computes_the_reciprocal_in_the_kernel() -> None:
    """No cast or reciprocal of the scale per call: each would be a launch per static linear per
    decode step (the interpreter's own copies of the arguments are allowed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    ts = importlib.import_module("dsworker.ops.triton.quant_static")
    x, s, o = torch.randn(2, 64).to(torch.bfloat16), torch.tensor([0.02]), torch.tensor([1.0])
    with Ops() as ops:
        ts.static_quant(x, s, o)
    assert not {"aten.reciprocal", "aten._to_copy"} & ops.seen, sorted(ops.seen)


def test_static_quant_is_bit_exact_ties_to_even() -> None:
    ts = importlib.import_module("dsworker.ops.triton.quant_static")
    x = torch.randn(4, 700) * 3
    x[0, :6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])  # ties at scale 1, offset 0
    x[1] = 1e4  # saturates
    for sc, off in ((1.0, 0.0), (0.02, -3.0)):
        s, o = torch.tensor([sc]), torch.tensor([off])
        got = ts.static_quant(x, s, o)
        assert torch.equal(got, qf.quantize_static(x, s, o)), (sc, off)
    assert ts.static_quant(x, torch.tensor([1.0]), torch.tensor([0.0]))[0, :6].tolist() == [
        0,
        2,
        2,
        0,
        -2,
        -2,
    ]
