"""Multi-head latent attention (MLA) in the absorbed form, heads split over the tp group.

Decode steps (few tokens per sequence) attend per token row in one fused op over the paged
cache (`dsworker::mla_decode`, query rope inside); longer steps pad queries per sequence. Either
way the cache write (latent norm, key rope, paged store) is one op (`dsworker::mla_cache_store`).
The cache holds only the normalised latent c and the shared rope key, so decode reads 576 values
per token per layer (V3). Scores are q_nope·(W_UK c) + q_pe·k_pe computed as (W_UK^T q_nope)·c,
and the output W_UV (sum p c): the same numbers as expanding k/v per head, without materialising
them. q_a_proj and kv_a_proj_with_mqa are replicated; q_b/q_proj and kv_b split by whole heads
(column-parallel), o_proj row-parallel with an all-reduce over tp.
"""

from __future__ import annotations

import torch
from torch import nn

from dsworker.model.batch import Batch, LayerKV
from dsworker.model.config import ModelArgs
from dsworker.model.layers import Linear, RMSNorm
from dsworker.model.rope import Rope
from dsworker.ops.mla_cache import mla_cache_store
from dsworker.ops.mla_decode import mla_decode
from dsworker.parallel.groups import Group

SCORE_BYTES = 256 << 20  # fp32 attention scores one block of query rows may hold


def query_rows_per_chunk(seqs: int, heads: int, keys: int) -> int:
    """Query rows per attention block so [seqs, heads, rows, keys] fp32 stays in SCORE_BYTES."""
    return max(1, SCORE_BYTES // (4 * seqs * heads * max(1, keys)))


class MLA(nn.Module):
    def __init__(
        self, args: ModelArgs, tp: Group, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.tp = tp
        self.heads = args.num_heads // tp.size
        self.dn, self.dr, self.dv = args.qk_nope_dim, args.qk_rope_dim, args.v_head_dim
        self.rank = args.kv_lora_rank
        self.eps = args.rms_norm_eps
        h, qk = args.hidden_size, args.qk_head_dim
        if args.q_lora_rank:
            self.q_a_proj = Linear(args.q_lora_rank, h, dtype, device, args.quant)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, self.eps, dtype, device)
            self.q_b_proj = Linear(self.heads * qk, args.q_lora_rank, dtype, device, args.quant)
        else:
            self.q_proj = Linear(self.heads * qk, h, dtype, device, args.quant)
        self.kv_a_proj_with_mqa = Linear(self.rank + self.dr, h, dtype, device, args.quant)
        self.kv_a_layernorm = RMSNorm(self.rank, self.eps, dtype, device)
        # kv_b stays in the compute dtype (dequantised at load): absorbed MLA uses it both ways
        self.kv_b_proj = Linear(self.heads * (self.dn + self.dv), self.rank, dtype, device)
        self.o_proj = Linear(h, self.heads * self.dv, dtype, device, args.quant)

    def forward(
        self,
        x: torch.Tensor,
        batch: Batch,
        cache: LayerKV,
        rope: Rope,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        t = x.shape[0]
        if t == 0:  # this dp group has nothing to run this step (its tp peers neither)
            return x
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(t, self.heads, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        cos, sin = cos_sin
        mla_cache_store(
            self.kv_a_proj_with_mqa(x),
            self.kv_a_layernorm.weight,
            self.eps,
            cos,
            sin,
            cache.all_kv,  # the whole cache, not a view of it: inductor reorders view mutations
            cache.all_pe,
            cache.layer,
            cache.write,
            rope.interleave,
        )
        w = self.kv_b_proj.weight.view(self.heads, self.dn + self.dv, self.rank)
        q_lat = torch.einsum("thd,hdc->thc", q_nope, w[:, : self.dn])
        if cache.row_pages is not None and cache.lengths is not None:  # a decode step
            ctx = mla_decode(q_lat, q_pe, cache.kv, cache.pe, cache.row_pages, cache.lengths,
                             rope.softmax_scale, cos, sin, rope.interleave)  # fmt: skip
        else:
            ctx = self._prefill(q_lat, rope.apply(q_pe, cos, sin), batch, cache, rope.softmax_scale)
        out = torch.einsum("thc,hdc->thd", ctx, w[:, self.dn :]).reshape(t, self.heads * self.dv)
        return self.tp.all_reduce(self.o_proj(out))

    def _prefill(
        self, q_lat: torch.Tensor, q_pe: torch.Tensor, batch: Batch, cache: LayerKV, scale: float
    ) -> torch.Tensor:
        """Queries padded per sequence [B, max_q], attended in blocks of rows -> ctx [T, H, rank]."""
        keys, keys_pe = cache.keys()  # [B, K, rank], [B, K, dr]
        b, lq = batch.num_seqs, batch.max_q
        qa = q_lat.new_zeros(b, lq, self.heads, self.rank)
        qp = q_pe.new_zeros(b, lq, self.heads, self.dr)
        qa[batch.seq, batch.row] = q_lat
        qp[batch.seq, batch.row] = q_pe
        k_pos = torch.arange(batch.max_k, device=q_lat.device)
        visible = k_pos[None, None, :] <= batch.q_pos[:, :, None]  # causal, per sequence
        rows = query_rows_per_chunk(b, self.heads, batch.max_k)
        blocks = [  # a long prefill: bound the fp32 scores, one block of query rows at a time
            self._attend(
                qa[:, i : i + rows],
                qp[:, i : i + rows],
                keys,
                keys_pe,
                visible[:, i : i + rows],
                scale,
            )  # fmt: skip
            for i in range(0, lq, rows)
        ]
        ctx = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        return ctx[batch.seq, batch.row]  # [T, H, rank]

    @staticmethod
    def _attend(
        qa: torch.Tensor,
        qp: torch.Tensor,
        keys: torch.Tensor,
        keys_pe: torch.Tensor,
        visible: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Softmax attention of query rows [B, q, H, .] over the latents: ctx [B, q, H, rank]."""
        scores = torch.einsum("bqhc,bkc->bhqk", qa, keys)
        scores = scores + torch.einsum("bqhr,bkr->bhqk", qp, keys_pe)
        scores = scores.float().mul(scale).masked_fill(~visible[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(qa.dtype)
        return torch.einsum("bhqk,bkc->bqhc", probs, keys)
