"""MLA prefill through SDPA (per-head expanded keys, causal aligned to the end) against the
reference: absorbed attention over queries padded per sequence (MLA._attend), on a paged cache,
for odd lengths, prefix-cache hits, several sequences and mixed steps (decodes beside a chunk)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsworker.contract.layout import ParallelPlan
from dsworker.model import attention
from dsworker.model.attention import MLA
from dsworker.model.batch import Batch, KVCache
from dsworker.model.config import ModelArgs
from dsworker.model.rope import Rope
from dsworker.ops.mla_cache import mla_cache_store
from dsworker.parallel.groups import build_groups

CPU = torch.device("cpu")
MAX_LEN, PAGE, SLOTS = 48, 8, 4
Item = tuple[int, int, int]  # slot, start, new tokens


class Setup:
    def __init__(self, args: ModelArgs, dtype: torch.dtype, seed: int) -> None:
        torch.manual_seed(seed)
        self.mla = MLA(args, build_groups(ParallelPlan(1, 1, 1, 1, 1), 0, "gloo").tp, dtype, CPU)
        for p in self.mla.parameters():
            p.data.copy_(torch.randn(p.shape) * 0.3)
        self.rope = Rope(args, CPU)
        self.rope.ensure(MAX_LEN)
        pages = SLOTS * MAX_LEN // PAGE
        self.cache = KVCache(1, SLOTS, MAX_LEN, args.kv_lora_rank, args.qk_rope_dim, dtype, CPU,
                             page_size=PAGE, num_pages=pages)  # fmt: skip
        order = torch.randperm(pages).view(SLOTS, -1)
        for s in range(SLOTS):
            self.cache.assign(s, order[s].tolist())
        self.hidden = args.hidden_size
        self.dtype = dtype

    def step(self, items: list[Item], reference: bool = False) -> torch.Tensor:
        batch = Batch.build([(s, start, [0] * n) for s, start, n in items], CPU)
        x = torch.randn(batch.num_tokens, self.hidden).to(self.dtype)
        cos_sin = self.rope.cos_sin(batch.positions, batch.max_k)
        kv = self.cache.bind(batch)(0)
        if reference:
            return padded_reference(self.mla, x, batch, kv, self.rope, cos_sin)
        return self.mla(x, batch, kv, self.rope, cos_sin)


def padded_reference(
    mla: MLA,
    x: torch.Tensor,
    batch: Batch,
    kv: object,
    rope: Rope,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The attention the engine ran before SDPA: absorbed, queries padded per sequence."""
    t = x.shape[0]
    q = mla.q_b_proj(mla.q_a_layernorm(mla.q_a_proj(x)))
    q_nope, q_pe = q.view(t, mla.heads, mla.dn + mla.dr).split([mla.dn, mla.dr], dim=-1)
    cos, sin = cos_sin
    mla_cache_store(mla.kv_a_proj_with_mqa(x), mla.kv_a_layernorm.weight, mla.eps, cos, sin,
                    kv.all_kv, kv.all_pe, kv.layer, kv.write, rope.interleave)  # type: ignore[attr-defined]  # fmt: skip
    w = mla.kv_b_proj.weight.view(mla.heads, mla.dn + mla.dv, mla.rank)
    q_lat = torch.einsum("thd,hdc->thc", q_nope, w[:, : mla.dn])
    q_pe = rope.apply(q_pe, cos, sin)
    keys, keys_pe = kv.keys()  # type: ignore[attr-defined]
    b, lq = batch.num_seqs, batch.max_q
    qa = q_lat.new_zeros(b, lq, mla.heads, mla.rank)
    qp = q_pe.new_zeros(b, lq, mla.heads, mla.dr)
    qa[batch.seq, batch.row] = q_lat
    qp[batch.seq, batch.row] = q_pe
    visible = torch.arange(batch.max_k)[None, None, :] <= batch.q_pos[:, :, None]
    ctx = MLA._attend(qa, qp, keys, keys_pe, visible, rope.softmax_scale)[batch.seq, batch.row]
    out = torch.einsum("thc,hdc->thd", ctx, w[:, mla.dn :]).reshape(t, mla.heads * mla.dv)
    return mla.o_proj(out)


CASES = {
    "one prompt, odd length": ([], [(0, 0, 13)]),
    "prefix hit, odd chunks": ([(1, 0, 9), (2, 0, 16)], [(1, 9, 7), (2, 16, 5)]),
    "chunk after chunk": ([(0, 0, 5)], [(0, 5, 11), (3, 0, 7)]),
    "mixed with decodes": ([(1, 0, 20), (2, 0, 7), (0, 0, 5)], [(0, 5, 11), (1, 20, 1), (2, 7, 2)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_prefill_equals_padded_reference(case: str, dtype: torch.dtype, tiny_v3: Path) -> None:
    prefix, items = CASES[case]
    setup = Setup(ModelArgs.from_dir(tiny_v3), dtype, seed=len(case))
    if prefix:
        setup.step(prefix)  # the cached positions the step's items start after
    torch.manual_seed(1)
    got = setup.step(items)
    torch.manual_seed(1)
    want = setup.step(items, reference=True)
    atol = 1e-5 if dtype == torch.float32 else 3e-2 * want.abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=1e-4 if atol < 1 else 0)


def test_mixed_step_routes_decodes_to_the_decode_op(tiny_v3: Path) -> None:
    """Only the chunk expands keys; the decode rows of a mixed step go to the absorbed op."""
    items = [(0, 5, 11), (1, 20, 1), (2, 7, 2)]
    batch = Batch.build([(s, start, [0] * n) for s, start, n in items], CPU)
    assert batch.short_rows is not None and batch.short_rows.tolist() == [11, 12, 13]
    assert batch.spans == ((5, 11), (20, 1), (7, 2))
    assert Batch.build([(0, 5, [0] * 11)], CPU).short_rows is None


def test_heads_in_blocks(tiny_v3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prompt expands keys and values a block of heads at a time: here one head."""
    monkeypatch.setattr(attention, "EXPAND_BYTES", 1)
    assert attention.heads_per_block(16, 1000, 192, 2) == 1
    setup = Setup(ModelArgs.from_dir(tiny_v3), torch.float32, seed=3)
    setup.step([(1, 0, 9)])
    torch.manual_seed(1)
    got = setup.step([(1, 9, 7)])
    torch.manual_seed(1)
    torch.testing.assert_close(got, setup.step([(1, 9, 7)], reference=True), atol=1e-5, rtol=1e-4)
