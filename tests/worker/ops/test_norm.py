"""dsworker::rms_norm / add_rms_norm against model/layers.py, transformers' RMSNorm, and their
Triton kernel in the interpreter."""

from __future__ import annotations

import pytest
import torch
from fused_op_helpers import DEVICE, ODD_ROWS, assert_close, kernels, preset_args

from dsworker.model.layers import rms_norm as engine_rms_norm
from dsworker.ops.norm import add_rms_norm, rms_norm

EPS = 1e-6


def _inputs(rows: int, dim: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x, res = (torch.randn(rows, dim, generator=g).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    return x, res, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_engine(dtype: torch.dtype) -> None:
    x, res, w = _inputs(7, 512, dtype, 0)
    assert torch.equal(rms_norm(x, w, EPS), engine_rms_norm(x, w, EPS))
    normed, new_res = add_rms_norm(x, res, w, EPS)
    summed = res + x  # the layer's `x = x + block(...)`
    assert torch.equal(new_res, summed)
    assert torch.equal(normed, engine_rms_norm(summed, w, EPS))


def test_reference_equals_transformers() -> None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    x, _, w = _inputs(5, 256, torch.bfloat16, 1)
    hf = DeepseekV3RMSNorm(256, EPS).to(torch.bfloat16)
    hf.weight.data.copy_(w)
    assert_close(rms_norm(x, w, EPS), hf(x), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["tiny", "small", "bench"])
def test_triton_equals_reference(preset: str, dtype: torch.dtype) -> None:
    k = kernels("norm")
    args = preset_args(preset)
    for dim in (args.hidden_size, args.kv_lora_rank):
        for rows in ODD_ROWS:
            x, res, w = _inputs(rows, dim, dtype, rows)
            out, none = k.rms_norm_triton(x.to(DEVICE), None, w.to(DEVICE), EPS)
            assert none is None
            assert_close(out.cpu(), rms_norm(x, w, EPS), 2)
            normed, new_res = k.rms_norm_triton(x.to(DEVICE), res.to(DEVICE), w.to(DEVICE), EPS)
            ref_normed, ref_res = add_rms_norm(x, res, w, EPS)
            assert_close(new_res.cpu(), ref_res, 1)  # the interpreter truncates to bf16
            assert_close(normed.cpu(), ref_normed, 2)


def test_triton_reads_strided_rows() -> None:
    """A view with a row stride (a split of a wider projection, like MLA's latent) is read in place."""
    k = kernels("norm")
    wide, _, w = _inputs(3, 96, torch.float32, 2)
    latent = wide[:, :64]
    out, _ = k.rms_norm_triton(latent.to(DEVICE), None, w[:64].to(DEVICE), EPS)
    assert_close(out.cpu(), rms_norm(latent.contiguous(), w[:64], EPS), 2)


def test_opcheck() -> None:
    x, res, w = _inputs(3, 64, torch.bfloat16, 3)
    torch.library.opcheck(torch.ops.dsworker.rms_norm.default, (x, w, EPS))
    torch.library.opcheck(torch.ops.dsworker.add_rms_norm.default, (x, res, w, EPS))
