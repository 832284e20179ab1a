"""ModelArgs: the config.json facts the forward pass needs, for V2 and V3 (both naming styles).

Read from the validated config (contract.model_config: types, ranges, routing defaults by
architecture, the rope from `rope_parameters` or `rope_scaling`), with the MLA sizes only the
engine requires.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsworker.checkpoint.hf_checkpoint import read_model_config
from dsworker.checkpoint.quant_description import read_quant_description
from dsworker.contract.model_config import (
    ModelConfig,
    ModelConfigError,
    ModelDims,
    RopeConfig,
    parse_model_config,
)
from dsworker.contract.precision import (
    Precision,
    QuantDescription,
    module_precision,
    static_unsupported,
)
from dsworker.contract.quant import W8A8_STATIC, QuantFormat


@dataclass(frozen=True)
class ModelArgs:
    arch: str  # "DeepseekV2" | "DeepseekV3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_layers: int
    first_k_dense: int
    num_heads: int
    q_lora_rank: int  # 0 = plain q_proj (V2-Lite)
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    top_k: int
    n_group: int
    topk_group: int
    topk_method: str  # "noaux_tc" | "greedy" | "group_limited_greedy"
    scoring_func: str  # "sigmoid" | "softmax"
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    max_position_embeddings: int
    num_mtp_layers: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    eos_token_ids: tuple[int, ...] = ()
    dims: ModelDims | None = None
    quant: QuantFormat | None = None  # 8-bit format of the linear weights (kept 8-bit on device)
    precision: Precision | None = None  # which linear modules are stored in `quant` (None: all)

    def linear_format(self, module: str) -> QuantFormat | None:
        """The format a linear module's weight is held in (None: the compute dtype)."""
        return self.precision.format_of(module) if self.precision else self.quant

    def fused_format(self, modules: list[str], what: str) -> QuantFormat | None:
        """The one format of weights fused into one tensor (ModelConfigError if they differ)."""
        return self.precision.stack_format(modules, what) if self.precision else self.quant

    def mlp_formats(self, prefix: str) -> tuple[QuantFormat | None, QuantFormat | None]:
        """(gate+up, down) formats of the MLP at `prefix`."""
        w13 = self.fused_format([f"{prefix}.gate_proj", f"{prefix}.up_proj"], prefix)
        w2 = self.linear_format(f"{prefix}.down_proj")
        if w2 is not None and w2.kind == W8A8_STATIC:
            raise ModelConfigError(static_unsupported(f"{prefix}.down_proj", prefix), "quantize")
        return w13, w2

    def expert_formats(self, prefix: str) -> tuple[QuantFormat | None, QuantFormat | None]:
        """(gate+up, down) formats of the routed experts at `prefix` (one stack per layer)."""
        ids = range(self.n_routed_experts)
        w13 = [f"{prefix}.{j}.{p}" for j in ids for p in ("gate_proj", "up_proj")]
        w2 = [f"{prefix}.{j}.down_proj" for j in ids]
        return (
            self.fused_format(w13, f"{prefix}.*.gate_proj/up_proj"),
            self.fused_format(w2, f"{prefix}.*.down_proj"),
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ModelArgs:
        """From a config.json object (ModelConfigError naming the key when malformed)."""
        return cls.from_model_config(parse_model_config(cfg))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelArgs:
        """From a checkpoint or layout directory: config.json and msModelSlim's description."""
        root = Path(model_dir)
        return cls.from_model_config(read_model_config(root), read_quant_description(root))

    @classmethod
    def from_model_config(
        cls, mc: ModelConfig, description: QuantDescription | None = None
    ) -> ModelArgs:
        dims = mc.dims
        precision = module_precision(mc.raw, description, mc.where)
        return cls(
            arch=dims.architecture,
            vocab_size=dims.vocab_size,
            hidden_size=dims.hidden_size,
            intermediate_size=dims.intermediate_size,
            moe_intermediate_size=dims.moe_intermediate_size,
            num_layers=dims.num_hidden_layers,
            first_k_dense=dims.first_k_dense_replace,
            num_heads=dims.num_attention_heads,
            q_lora_rank=mc.q_lora_rank,
            kv_lora_rank=mc.require("kv_lora_rank"),
            qk_nope_dim=mc.require("qk_nope_head_dim"),
            qk_rope_dim=mc.require("qk_rope_head_dim"),
            v_head_dim=mc.require("v_head_dim"),
            n_routed_experts=dims.n_routed_experts,
            n_shared_experts=dims.n_shared_experts,
            top_k=mc.require("num_experts_per_tok"),
            n_group=mc.n_group,
            topk_group=mc.topk_group,
            topk_method=mc.topk_method,
            scoring_func=mc.scoring_func,
            norm_topk_prob=mc.norm_topk_prob,
            routed_scaling_factor=mc.routed_scaling_factor,
            rms_norm_eps=mc.rms_norm_eps,
            max_position_embeddings=mc.max_position_embeddings or 4096,
            num_mtp_layers=dims.num_nextn_predict_layers,
            rope=mc.rope,
            eos_token_ids=mc.eos_token_ids,
            dims=dims,
            quant=precision.fmt,
            precision=precision,
        )
