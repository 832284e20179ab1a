"""Multi-head latent attention (MLA) in the absorbed form, heads split over the tp group.

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
        q = q.view(t, self.heads, self.dn + self.dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.dr], dim=-1)
        latent = self.kv_a_layernorm(latent)
        cos, sin = cos_sin
        q_pe = rope.apply(q_pe, cos, sin)
        k_pe = rope.apply(k_pe, cos, sin)

        cache.store(latent, k_pe)
        keys, keys_pe = cache.keys()  # [B, K, rank], [B, K, dr]

        w = self.kv_b_proj.weight.view(self.heads, self.dn + self.dv, self.rank)
        q_lat = torch.einsum("thd,hdc->thc", q_nope, w[:, : self.dn])
        b, lq = batch.num_seqs, batch.max_q
        qa = q_lat.new_zeros(b, lq, self.heads, self.rank)
        qp = q_pe.new_zeros(b, lq, self.heads, self.dr)
        qa[batch.seq, batch.row] = q_lat
        qp[batch.seq, batch.row] = q_pe
        k_pos = torch.arange(batch.max_k, device=x.device)
        visible = k_pos[None, None, :] <= batch.q_pos[:, :, None]  # causal, per sequence
        rows = query_rows_per_chunk(b, self.heads, batch.max_k)
        if rows >= lq:
            ctx = self._attend(qa, qp, keys, keys_pe, visible, rope.softmax_scale)
        else:  # a long prefill: bound the fp32 score tensor, one block of query rows at a time
            ctx = torch.cat(
                [
                    self._attend(
                        qa[:, i : i + rows],
                        qp[:, i : i + rows],
                        keys,
                        keys_pe,
                        visible[:, i : i + rows],
                        rope.softmax_scale,
                    )
                    for i in range(0, lq, rows)
                ],
                dim=1,
            )
        ctx = ctx[batch.seq, batch.row]  # [T, H, rank]
        out = torch.einsum("thc,hdc->thd", ctx, w[:, self.dn :]).reshape(t, self.heads * self.dv)
        return self.tp.all_reduce(self.o_proj(out))

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
