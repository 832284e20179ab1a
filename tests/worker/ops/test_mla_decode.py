"""dsworker::mla_decode against the engine's decode attention (KVCache pages, Rope, MLA._attend)
and its Triton kernel (single split and split-KV) in the interpreter."""

from __future__ import annotations

import pytest
import torch
from fused_op_helpers import DEVICE, ODD_ROWS, assert_close, kernels, preset_args

from dsworker.model.attention import MLA
from dsworker.model.batch import Batch, KVCache
from dsworker.model.config import ModelArgs
from dsworker.model.rope import Rope
from dsworker.ops.mla_decode import mla_decode

ULPS = {torch.float32: 64, torch.bfloat16: 4}
CPU = torch.device("cpu")


def _cache(args: ModelArgs, slots: int, max_len: int, page: int, dtype: torch.dtype) -> KVCache:
    """A paged cache with shuffled pages per slot, every position filled."""
    cache = KVCache(1, slots, max_len, args.kv_lora_rank, args.qk_rope_dim, dtype, CPU,
                    page_size=page, num_pages=slots * (max_len // page))  # fmt: skip
    pages = torch.randperm(cache.num_pages).view(slots, -1)
    for s in range(slots):
        cache.assign(s, pages[s].tolist())
    cache.kv.copy_(torch.randn(cache.kv.shape).to(dtype))
    cache.pe.copy_(torch.randn(cache.pe.shape).to(dtype))
    return cache


def _step(args: ModelArgs, rows: int, dtype: torch.dtype, page: int, max_len: int, seed: int):
    """One decode step: (op inputs, the engine's result) on the same cache and queries."""
    torch.manual_seed(seed)
    cache = _cache(args, rows + 1, max_len, page, dtype)
    positions = torch.randint(0, max_len, (rows, 1))
    positions[0, 0] = max_len - 1
    slots = torch.randperm(rows + 1)[:rows]
    batch = Batch.decode(torch.zeros(rows, 1, dtype=torch.long), positions, slots, max_len)
    layer = cache.bind(batch)(0)
    rope = Rope(args, CPU)
    cos, sin = rope.cos_sin(batch.positions, max_len)
    heads = args.num_heads
    q_lat = torch.randn(rows, heads, args.kv_lora_rank).to(dtype)
    q_pe = torch.randn(rows, heads, args.qk_rope_dim).to(dtype)
    keys, keys_pe = layer.keys()
    visible = torch.arange(max_len)[None, None, :] <= batch.q_pos[:, :, None]
    qp = rope.apply(q_pe, cos, sin)
    ctx = MLA._attend(q_lat[:, None], qp[:, None], keys, keys_pe, visible, rope.softmax_scale)
    inputs = (q_lat, q_pe, layer.kv, layer.pe, layer.read, batch.positions + 1,
              rope.softmax_scale, cos, sin, rope.interleave)  # fmt: skip
    return inputs, ctx[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_reference_equals_engine(preset: str, dtype: torch.dtype) -> None:
    """The engine rounds scores and probabilities to bf16; the op keeps them fp32 (closer to
    the fp32 truth), so bf16 is compared at bf16 tolerance of the larger error."""
    inputs, expected = _step(preset_args(preset), 5, dtype, 16, 64, 0)
    out = mla_decode(*inputs)
    if dtype == torch.float32:
        assert_close(out, expected, 64)
    else:
        truth, _ = _step(preset_args(preset), 5, torch.float32, 16, 64, 0)
        ref32 = mla_decode(*truth)
        err_op = (out.float() - ref32).abs().max()
        err_engine = (expected.float() - ref32).abs().max()
        assert err_op <= err_engine + 1e-3
        assert_close(out, expected, 8)


def test_pre_rotated_query_and_empty_rows() -> None:
    inputs, expected = _step(preset_args("tiny"), 3, torch.float32, 8, 32, 1)
    q_lat, q_pe, kv, pe, table, lengths, scale, cos, sin, inter = inputs
    rotated = Rope(preset_args("tiny"), CPU).apply(q_pe, cos, sin)
    out = mla_decode(q_lat, rotated, kv, pe, table, lengths, scale, None, None, inter)
    assert_close(out, expected, 64)
    empty = mla_decode(
        q_lat, q_pe, kv, pe, table, torch.zeros_like(lengths), scale, cos, sin, inter
    )
    assert torch.equal(empty, torch.zeros_like(empty))


def _to(inputs: tuple, device: str) -> tuple:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["tiny", "small", "bench"])
def test_triton_equals_reference(preset: str, dtype: torch.dtype) -> None:
    k = kernels("mla_decode")
    args = preset_args(preset)
    page, max_len = (16, 64) if preset != "bench" else (64, 256)
    for rows in ODD_ROWS if preset != "bench" else (1, 3):
        inputs, _ = _step(args, rows, dtype, page, max_len, rows)
        expected = mla_decode(*inputs)
        for splits in (1, 3):
            out = k.mla_decode_triton(*_to(inputs, DEVICE), num_splits=splits)
            assert_close(out.cpu(), expected, ULPS[dtype])


def test_triton_rotate_half_and_empty_rows() -> None:
    """Non-interleaved rope (V3 configs with rope_interleave false) and rows without keys."""
    k = kernels("mla_decode")
    inputs, _ = _step(preset_args("tiny"), 3, torch.float32, 8, 32, 2)
    inputs = (*inputs[:9], False)
    assert_close(k.mla_decode_triton(*_to(inputs, DEVICE)).cpu(), mla_decode(*inputs), 64)
    empty = (*inputs[:5], torch.zeros_like(inputs[5]), *inputs[6:])
    out = k.mla_decode_triton(*_to(empty, DEVICE), num_splits=2).cpu()
    assert torch.equal(out, torch.zeros_like(out))


def test_opcheck() -> None:
    inputs, _ = _step(preset_args("tiny"), 3, torch.bfloat16, 8, 32, 3)
    torch.library.opcheck(torch.ops.dsworker.mla_decode.default, inputs)


def test_opcheck_with_a_transposed_query() -> None:
    """The absorbed query arrives as a [H, N, rank] bmm result viewed [N, H, rank]: the fake must
    give the real output's (contiguous) strides, or compiled steps fail their stride check."""
    inputs, _ = _step(preset_args("tiny"), 3, torch.bfloat16, 8, 32, 3)
    q_t = inputs[0].transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_t.is_contiguous()
    torch.library.opcheck(torch.ops.dsworker.mla_decode.default, (q_t, *inputs[1:]))
