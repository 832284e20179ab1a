"""dsworker::mla_cache_store against the engine's separate steps (latent RMSNorm, Rope.apply on
the key, paged writes) and its Triton kernel in the interpreter."""

from __future__ import annotations

import pytest
import torch
from fused_op_helpers import DEVICE, ODD_ROWS, assert_close, kernels, preset_args

from dsworker.model.batch import Batch, KVCache
from dsworker.model.rope import Rope
from dsworker.ops.mla_cache import mla_cache_store
from dsworker.ops.norm import rms_norm_reference

CPU = torch.device("cpu")
EPS = 1e-6


def _case(preset: str, rows: int, dtype: torch.dtype, interleave: bool, seed: int = 0):
    """(op args, expected kv layer, expected pe layer) for `rows` tokens of distinct slots."""
    args = preset_args(preset)
    torch.manual_seed(seed)
    max_len, page = 32, 8
    cache = KVCache(2, rows + 1, max_len, args.kv_lora_rank, args.qk_rope_dim, dtype, CPU,
                    page_size=page, num_pages=(rows + 1) * (max_len // page))  # fmt: skip
    pages = torch.randperm(cache.num_pages).view(rows + 1, -1)
    for s in range(rows + 1):
        cache.assign(s, pages[s].tolist())
    positions = torch.randint(0, max_len, (rows, 1))
    slots = torch.randperm(rows + 1)[:rows]
    batch = Batch.decode(torch.zeros(rows, 1, dtype=torch.long), positions, slots, max_len)
    layer = cache.bind(batch)(1)
    rope = Rope(args, CPU)
    rope.interleave = interleave
    cos, sin = rope.cos_sin(batch.positions, max_len)
    kv_a = torch.randn(rows, args.kv_lora_rank + args.qk_rope_dim).to(dtype)
    w = (torch.rand(args.kv_lora_rank) + 0.5).to(dtype)
    latent, k_pe = kv_a.split([args.kv_lora_rank, args.qk_rope_dim], dim=-1)
    kv, pe = cache.kv[1].clone(), cache.pe[1].clone()
    kv.view(-1, kv.shape[-1])[layer.write] = rms_norm_reference(latent, w, EPS)
    pe.view(-1, pe.shape[-1])[layer.write] = rope.apply(k_pe, cos, sin)
    op_args = (kv_a, w, EPS, cos, sin, cache.kv, cache.pe, 1, layer.write, interleave)
    return op_args, kv, pe


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_engine_steps(dtype: torch.dtype, interleave: bool) -> None:
    (kv_a, w, eps, cos, sin, kv, pe, layer, write, inter), want_kv, want_pe = _case(
        "tiny", 5, dtype, interleave
    )
    other = kv[0].clone()
    mla_cache_store(kv_a, w, eps, cos, sin, kv, pe, layer, write, inter)
    assert torch.equal(kv[1], want_kv) and torch.equal(pe[1], want_pe)
    assert torch.equal(kv[0], other)  # only the named layer is written


def test_zero_rows_and_bad_shapes() -> None:
    (kv_a, w, eps, cos, sin, kv, pe, layer, write, inter), _, _ = _case(
        "tiny", 3, torch.float32, True
    )
    before = kv.clone()
    mla_cache_store(kv_a[:0], w, eps, cos[:0], sin[:0], kv, pe, layer, write[:0], inter)
    assert torch.equal(kv, before)
    with pytest.raises(ValueError, match="layer in range"):
        mla_cache_store(kv_a, w, eps, cos, sin, kv, pe, 2, write, inter)
    with pytest.raises(ValueError, match="rank \\+ rope"):
        mla_cache_store(kv_a[:, 1:], w, eps, cos, sin, kv, pe, layer, write, inter)


def test_opcheck() -> None:
    op_args, _, _ = _case("tiny", 3, torch.float32, True)
    torch.library.opcheck(torch.ops.dsworker.mla_cache_store.default, op_args)


@pytest.mark.parametrize("preset", ["tiny", "small", "bench"])
@pytest.mark.parametrize("interleave", [True, False])
def test_triton_equals_reference(preset: str, interleave: bool) -> None:
    k = kernels("mla_cache")
    for rows in ODD_ROWS:
        (kv_a, w, eps, cos, sin, kv, pe, layer, write, inter), want_kv, want_pe = _case(
            preset, rows, torch.bfloat16, interleave, seed=rows
        )
        kv, pe = kv.to(DEVICE), pe.to(DEVICE)
        k.mla_cache_store_triton(kv_a.to(DEVICE), w.to(DEVICE), eps, cos.to(DEVICE),
                                 sin.to(DEVICE), kv[layer], pe[layer], write.to(DEVICE),
                                 inter)  # fmt: skip
        assert_close(kv[layer].cpu(), want_kv, 2)  # rsqrt order: one bf16 rounding apart
        assert_close(pe[layer].cpu(), want_pe, 2)
