"""Multi-head latent attention (MLA), heads split over the tp group.

Decode steps (few tokens per sequence) attend per token row in the absorbed form, in one fused
op over the paged cache (`dsworker::mla_decode`, query rope inside): scores q_nope·(W_UK c) +
q_pe·k_pe computed as (W_UK^T q_nope)·c, output W_UV (sum p c), so decode reads only the 576
cached values per token per layer (V3). Prompt chunks instead expand keys [W_UK c; k_pe] and
values W_UV c per head and run torch's scaled_dot_product_attention (flash on CUDA, bf16), causal
aligned to the end of the sequence's keys (a prefix-cache hit or an earlier chunk before it):
fewer FLOPs per query-key pair than the absorbed form when queries are many. A mixed step does
both, each for its own items. The cache write (latent norm, key rope, paged store) is one op
(`dsworker::mla_cache_store`). q_a_proj and kv_a_proj_with_mqa are replicated; q_b/q_proj and
kv_b split by whole heads (column-parallel), o_proj row-parallel with an all-reduce over tp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from dsworker.contract.quant import QuantFormat
from dsworker.model.batch import DECODE_MAX_Q, Batch, LayerKV
from dsworker.model.config import ModelArgs
from dsworker.model.layers import Linear, RMSNorm
from dsworker.model.rope import Rope
from dsworker.ops.mla_cache import mla_cache_store
from dsworker.ops.mla_decode import mla_decode
from dsworker.parallel.groups import Group

EXPAND_BYTES = 512 << 20  # per-head keys and values one prefill block may expand


def heads_per_block(heads: int, keys: int, width: int, elem: int) -> int:
    """Heads whose expanded keys and values ([heads, keys, width] each) fit EXPAND_BYTES."""
    return max(1, min(heads, EXPAND_BYTES // max(1, 2 * keys * width * elem)))


class MLA(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        tp: Group,
        dtype: torch.dtype,
        device: torch.device,
        prefix: str = "model.layers.0.self_attn",
    ) -> None:
        super().__init__()
        self.tp = tp
        self.heads = args.num_heads // tp.size
        self.dn, self.dr, self.dv = args.qk_nope_dim, args.qk_rope_dim, args.v_head_dim
        self.rank = args.kv_lora_rank
        self.eps = args.rms_norm_eps
        h, qk = args.hidden_size, args.qk_head_dim

        def fmt(name: str) -> QuantFormat | None:
            return args.linear_format(f"{prefix}.{name}")

        if args.q_lora_rank:
            self.q_a_proj = Linear(args.q_lora_rank, h, dtype, device, fmt("q_a_proj"))
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, self.eps, dtype, device)
            self.q_b_proj = Linear(
                self.heads * qk, args.q_lora_rank, dtype, device, fmt("q_b_proj")
            )
        else:
            self.q_proj = Linear(self.heads * qk, h, dtype, device, fmt("q_proj"))
        self.kv_a_proj_with_mqa = Linear(
            self.rank + self.dr, h, dtype, device, fmt("kv_a_proj_with_mqa")
        )
        self.kv_a_layernorm = RMSNorm(self.rank, self.eps, dtype, device)
        # kv_b stays in the compute dtype (dequantised at load): absorbed MLA uses it both ways
        self.kv_b_proj = Linear(self.heads * (self.dn + self.dv), self.rank, dtype, device)
        self.o_proj = Linear(
            h, self.heads * self.dv, dtype, device, fmt("o_proj"), partial=tp.rank > 0
        )

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
        if cache.row_pages is not None and cache.lengths is not None and cache.rows is None:
            out = self._absorbed(q_nope, q_pe, w, cache, cache.row_pages, cache.lengths, cos_sin,
                                 rope)  # fmt: skip
        else:
            out = self._prefill(q_nope, q_pe, w, batch, cache, cos_sin, rope)
        return self.tp.all_reduce(self.o_proj(out.reshape(t, self.heads * self.dv)))

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        w: torch.Tensor,
        cache: LayerKV,
        row_pages: torch.Tensor,
        lengths: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rope: Rope,
    ) -> torch.Tensor:
        """Rows with few new tokens: each attends over its own pages in latent space, in one op
        (W_UK folded into the query, W_UV applied after) -> [rows, H, dv]."""
        q_lat = torch.einsum("thd,hdc->thc", q_nope, w[:, : self.dn])
        cos, sin = cos_sin
        ctx = mla_decode(q_lat, q_pe, cache.kv, cache.pe, row_pages, lengths, rope.softmax_scale,
                         cos, sin, rope.interleave)  # fmt: skip
        return torch.einsum("thc,hdc->thd", ctx, w[:, self.dn :])

    def _prefill(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        w: torch.Tensor,
        batch: Batch,
        cache: LayerKV,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rope: Rope,
    ) -> torch.Tensor:
        """A step with prompt chunks -> [T, H, dv]: each long item through SDPA (flash where the
        device has it) over its keys and values expanded per head; the short items of a mixed
        step (decodes beside a prompt chunk) through the absorbed decode op."""
        out = q_nope.new_empty(q_nope.shape[0], self.heads, self.dv)
        if cache.rows is not None and cache.row_pages is not None and cache.lengths is not None:
            cos, sin = cos_sin
            rows = cache.rows
            short = self._absorbed(q_nope[rows], q_pe[rows], w, cache, cache.row_pages,
                                   cache.lengths, (cos[rows], sin[rows]), rope)  # fmt: skip
            out[rows] = short
        keys, keys_pe = cache.keys()  # [B, K, rank], [B, K, dr]
        q_pe = rope.apply(q_pe, *cos_sin)
        at = 0
        for b, (start, n) in enumerate(batch.spans):
            if n > DECODE_MAX_Q or cache.rows is None:
                span = slice(at, at + n)
                out[span] = self._sdpa(q_nope[span], q_pe[span], keys[b, : start + n],
                                       keys_pe[b, : start + n], w, rope.softmax_scale)  # fmt: skip
            at += n
        return out

    def _sdpa(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c: torch.Tensor,
        k_pe: torch.Tensor,
        w: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """One sequence's n new rows over its K keys (the last n are the rows themselves),
        causal aligned to the end -> [n, H, dv]. Keys k = [W_UK c; k_pe] and values W_UV c are
        expanded per head, a block of heads at a time (bounded memory); values are zero-padded
        to the key width, which flash kernels need."""
        n, k_len = q_nope.shape[0], c.shape[0]
        width = self.dn + self.dr
        mask = None if n == 1 or n == k_len else causal_lower_right(n, k_len)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)  # [H, n, width]
        out = []
        step = heads_per_block(self.heads, k_len, width, c.element_size())
        for h in range(0, self.heads, step):
            wb = w[h : h + step]
            k_nope = torch.einsum("kc,hdc->hkd", c, wb[:, : self.dn])
            k = torch.cat((k_nope, k_pe.expand(wb.shape[0], -1, -1)), dim=-1)
            v = F.pad(torch.einsum("kc,hdc->hkd", c, wb[:, self.dn :]), (0, width - self.dv))
            o = F.scaled_dot_product_attention(q[None, h : h + step], k[None], v[None],
                                               attn_mask=mask, is_causal=n == k_len > 1,
                                               scale=scale)  # fmt: skip
            out.append(o[0, ..., : self.dv])
        return torch.cat(out).transpose(0, 1) if len(out) > 1 else out[0].transpose(0, 1)

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
