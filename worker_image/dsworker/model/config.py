"""ModelArgs: the config.json facts the forward pass needs, for V2 and V3 (both naming styles).

transformers 5 writes `rope_parameters` (with rope_theta inside) where older configs have
`rope_scaling` plus `rope_theta`; routing defaults follow the architecture when a config omits them
(V3: sigmoid + noaux_tc, V2: softmax + greedy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import ModelDims
from dsworker.contract.quant import QuantFormat, quant_format

TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING = ("sigmoid", "softmax")


@dataclass(frozen=True)
class RopeArgs:
    """Rotary embedding of the qk_rope part: plain, or YaRN with DeepSeek's mscale."""

    theta: float = 10000.0
    kind: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True
    interleave: bool = True  # pairs (x0,x1),(x2,x3)...; False = rotate_half halves


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
    rope: RopeArgs = field(default_factory=RopeArgs)
    eos_token_ids: tuple[int, ...] = ()
    dims: ModelDims | None = None
    quant: QuantFormat | None = None  # 8-bit format of the linear weights (kept 8-bit on device)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        dims = ModelDims.from_config(cfg)
        v3 = dims.architecture == "DeepseekV3"
        rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        kind = str(rp.get("rope_type", rp.get("type", "default")) or "default")
        if kind not in ("default", "yarn"):
            raise CheckpointError(
                f"config.json: rope type {kind!r} is not supported (default, yarn)"
            )
        max_pos = int(cfg.get("max_position_embeddings") or 4096)
        orig = int(rp.get("original_max_position_embeddings") or max_pos)
        rope = RopeArgs(
            theta=float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            kind=kind,
            factor=float(rp.get("factor") or max_pos / orig),
            original_max_position=orig,
            beta_fast=float(rp.get("beta_fast") or 32),
            beta_slow=float(rp.get("beta_slow") or 1),
            mscale=float(rp.get("mscale") or 0.0),
            mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
            attention_factor=rp.get("attention_factor"),
            truncate=bool(rp.get("truncate", True)),
            interleave=bool(cfg.get("rope_interleave", True)) if v3 else True,
        )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        n_group = int(cfg.get("n_group") or 1)
        method = str(cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy"))
        scoring = str(cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax"))
        if method not in TOPK_METHODS or scoring not in SCORING:
            raise CheckpointError(
                f"config.json: topk_method {method!r} / scoring_func {scoring!r} not supported "
                f"({', '.join(TOPK_METHODS)} / {', '.join(SCORING)})"
            )
        return cls(
            arch=dims.architecture,
            vocab_size=dims.vocab_size,
            hidden_size=dims.hidden_size,
            intermediate_size=dims.intermediate_size,
            moe_intermediate_size=dims.moe_intermediate_size,
            num_layers=dims.num_hidden_layers,
            first_k_dense=dims.first_k_dense_replace,
            num_heads=dims.num_attention_heads,
            q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_dim=int(cfg["qk_nope_head_dim"]),
            qk_rope_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            n_routed_experts=dims.n_routed_experts,
            n_shared_experts=dims.n_shared_experts,
            top_k=int(cfg["num_experts_per_tok"]),
            n_group=n_group,
            topk_group=int(cfg.get("topk_group") or n_group),
            topk_method=method,
            scoring_func=scoring,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", v3)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
            max_position_embeddings=max_pos,
            num_mtp_layers=dims.num_nextn_predict_layers,
            rope=rope,
            eos_token_ids=eos_ids,
            dims=dims,
            quant=quant_format(cfg),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelArgs:
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
