"""The DeepSeek V2/V3 decoder for one rank of a plan: build, expose load targets, run a step.

A server constructs it once per rank (`DeepseekModel(args, groups, opts, dtype, device)`), fills
its weights with `dsworker.engine.loader.load_weights`, allocates a `KVCache` with `new_cache`, and calls
`forward(Batch, cache)` for each step of its dp group's sequences. Every rank of the world must call
forward for every step (MoE exchanges span the world), with an empty Batch when it has no work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsworker.contract.errors import CheckpointError
from dsworker.model.attention import MLA
from dsworker.model.batch import Batch, KVCache, LayerKV
from dsworker.model.config import ModelArgs
from dsworker.model.layers import MLP, Linear, RMSNorm, VocabEmbedding, VocabHead
from dsworker.model.moe import MoE, MoEOptions, MoEStats
from dsworker.model.rope import Rope
from dsworker.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class EngineOptions:
    """Runtime choices that do not change the weights a rank holds."""

    moe: MoEOptions = field(default_factory=MoEOptions)
    mtp: bool = False  # build and load the MTP layer(s) for speculative decoding


@dataclass
class StepOutput:
    """logits [B, V] of each sequence's last token (or [T, V] for every token); hidden [T, H].

    `hidden` is the final-normed state the MTP layer consumes.
    """

    logits: torch.Tensor
    hidden: torch.Tensor


class DenseMLP(MLP):
    """A dense layer's MLP: column/row-parallel over tp, reduced here."""

    def __init__(
        self,
        args: ModelArgs,
        groups: ParallelGroups,
        dtype: torch.dtype,
        device: torch.device,
        prefix: str = "model.layers.0.mlp",
    ) -> None:
        inter = args.intermediate_size // groups.tp.size
        super().__init__(args.hidden_size, inter, dtype, device, args.mlp_formats(prefix))
        self.tp = groups.tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        index: int,
        groups: ParallelGroups,
        opts: EngineOptions,
        stats: MoEStats,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype, device)
        p = f"model.layers.{index}"
        self.self_attn = MLA(args, groups.tp, dtype, device, f"{p}.self_attn")
        self.mlp: nn.Module = (
            DenseMLP(args, groups, dtype, device, f"{p}.mlp")
            if index < args.first_k_dense
            else MoE(args, groups, opts.moe, stats, dtype, device, f"{p}.mlp")
        )

    def targets(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {
            f"{prefix}.input_layernorm.weight": self.input_layernorm.weight,
            f"{prefix}.post_attention_layernorm.weight": self.post_attention_layernorm.weight,
        }
        out.update({f"{prefix}.self_attn.{n}": p for n, p in self.self_attn.named_parameters()})
        out.update(self.mlp.targets(f"{prefix}.mlp"))
        return out

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: Batch,
        cache: LayerKV,
        rope: Rope,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output, residual stream before it): the stream is x + residual, left unsummed
        so the next norm adds it in the same op (residual None: x is the stream itself)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add(x, residual)
        attn = self.self_attn(h, batch, cache, rope, cos_sin)
        h, residual = self.post_attention_layernorm.add(attn, residual)
        moe = isinstance(self.mlp, MoE)
        out = self.mlp(h, batch.fixed_shape, batch.valid) if moe else self.mlp(h)
        return out, residual


class MTPLayer(nn.Module):
    """DeepSeek-V3 multi-token prediction: block(eh_proj[enorm(emb(t_i+1)); hnorm(h_i)]) -> t_i+2."""

    def __init__(
        self,
        args: ModelArgs,
        index: int,
        groups: ParallelGroups,
        opts: EngineOptions,
        stats: MoEStats,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        h, eps, v = args.hidden_size, args.rms_norm_eps, args.vocab_size
        self.index = index
        self.embed_tokens = VocabEmbedding(v, h, groups.tp, dtype, device)
        self.enorm = RMSNorm(h, eps, dtype, device)
        self.hnorm = RMSNorm(h, eps, dtype, device)
        self.eh_proj = Linear(h, 2 * h, dtype, device)
        self.block = DecoderLayer(args, index, groups, opts, stats, dtype, device)
        self.shared_norm = RMSNorm(h, eps, dtype, device)
        self.shared_head = VocabHead(v, h, groups.tp, dtype, device)

    def targets(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {
            f"{prefix}.embed_tokens.weight": self.embed_tokens.weight,
            f"{prefix}.enorm.weight": self.enorm.weight,
            f"{prefix}.hnorm.weight": self.hnorm.weight,
            f"{prefix}.eh_proj.weight": self.eh_proj.weight,
            f"{prefix}.shared_head.norm.weight": self.shared_norm.weight,
            f"{prefix}.shared_head.head.weight": self.shared_head.weight,
        }
        out.update(self.block.targets(prefix))
        return out


class DeepseekModel(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        groups: ParallelGroups,
        opts: EngineOptions | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        opts = opts or EngineOptions()
        device = torch.device(device)
        self.args, self.groups, self.opts, self.dtype = args, groups, opts, dtype
        self.stats = MoEStats()
        h, v = args.hidden_size, args.vocab_size
        self.embed = VocabEmbedding(v, h, groups.tp, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(args, i, groups, opts, self.stats, dtype, device)
            for i in range(args.num_layers)
        )
        self.norm = RMSNorm(h, args.rms_norm_eps, dtype, device)
        self.head = VocabHead(v, h, groups.tp, dtype, device)
        if opts.mtp and not args.num_mtp_layers:
            raise CheckpointError("MTP requested but config.json has num_nextn_predict_layers = 0")
        n_mtp = args.num_mtp_layers if opts.mtp else 0
        self.mtp = nn.ModuleList(
            MTPLayer(args, args.num_layers + j, groups, opts, self.stats, dtype, device)
            for j in range(n_mtp)
        )
        self.rope = Rope(args, device)
        self.device = device

    def targets(self) -> dict[str, torch.Tensor]:
        """Every checkpoint name (HF naming) this rank loads -> the tensor (view) it fills."""
        out = {
            "model.embed_tokens.weight": self.embed.weight,
            "model.norm.weight": self.norm.weight,
            "lm_head.weight": self.head.weight,
        }
        for i, layer in enumerate(self.layers):
            out.update(layer.targets(f"model.layers.{i}"))
        for m in self.mtp:
            out.update(m.targets(f"model.layers.{m.index}"))
        return out

    def new_cache(
        self,
        num_slots: int,
        max_len: int,
        page_size: int | None = None,
        num_pages: int | None = None,
    ) -> KVCache:
        """One slot per sequence; without pages given, each slot holds max_len positions."""
        a = self.args
        n = a.num_layers + len(self.mtp)
        self.rope.ensure(max_len)
        return KVCache(
            n,
            num_slots,
            max_len,
            a.kv_lora_rank,
            a.qk_rope_dim,
            self.dtype,
            self.device,
            page_size,
            num_pages,
        )

    def _logits(
        self, head: VocabHead, h: torch.Tensor, batch: Batch, every: bool, rows: torch.Tensor | None
    ) -> torch.Tensor:
        if rows is not None:
            return head(h[rows])
        return head(h if every else h[batch.last])

    @torch.no_grad()
    def forward(
        self,
        batch: Batch,
        cache: KVCache,
        all_logits: bool = False,
        rows: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step: write the new tokens' cache entries, return their logits.

        Logits of each sequence's last token, of every token (all_logits), or of the flat token
        indices `rows` (a speculative step verifies its drafts' rows too).
        """
        cache.check(batch)
        cos_sin = self.rope.cos_sin(batch.positions, batch.max_k)
        x, residual = self.embed(batch.input_ids), None
        layer_kv = cache.bind(batch)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, batch, layer_kv(i), self.rope, cos_sin)
        h = self.norm(x) if residual is None else self.norm.add(x, residual)[0]
        return StepOutput(self._logits(self.head, h, batch, all_logits, rows), h)

    @torch.no_grad()
    def forward_mtp(
        self,
        batch: Batch,
        hidden: torch.Tensor,
        cache: KVCache,
        depth: int = 0,
        all_logits: bool = False,
    ) -> StepOutput:
        """Draft logits of MTP layer `depth`: batch holds token i+1 at position i, hidden is h_i.

        Returns the layer's block output as `hidden` (the input of depth + 1).
        """
        m = self.mtp[depth]
        cos_sin = self.rope.cos_sin(batch.positions, batch.max_k)
        e = m.enorm(m.embed_tokens(batch.input_ids))
        x = m.eh_proj(torch.cat([e, m.hnorm(hidden)], dim=-1))
        kv = cache.bind(batch)(self.args.num_layers + depth)
        out, residual = m.block(x, None, batch, kv, self.rope, cos_sin)
        normed, x = m.shared_norm.add(out, residual)
        logits = self._logits(m.shared_head, normed, batch, all_logits, None)
        return StepOutput(logits, x)
