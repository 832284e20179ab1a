"""The config.json of synthesized checkpoints: the tiny, small and bench presets of V2 and V3.

The presets are sized for what they test: tiny loads in transformers in a second and divides by
every plan the tests use (its FP8 variant keeps whole 128-blocks on each split), small exercises
real vocab sizes, bench is the 3.54 B-parameter config of BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Any

from dsworker.chat.byte_level import BOS_ID, EOS_ID, MIN_VOCAB
from dsworker.contract.errors import CheckpointError

FORMATS = ("bf16", "fp8", "w8a8", "w8a16")
PRESETS = ("tiny", "small", "bench")
INIT_STD = 0.02

_V3_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
}
_V2_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "q_lora_rank": None,
    "n_group": 1,
    "topk_group": 1,
}
_TINY: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "num_attention_heads": 8,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    # Room for the serving defaults (maxSeqLen 2560) and a prompt offering tools. The yarn
    # parameters alone set the rotary numerics (kept as the engine tests' tolerances know them).
    "max_position_embeddings": 4096,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}
# FP8 shards must be whole 128-blocks on every split dim: tp up to 4 (q_b/kv_b rows and o_proj
# columns per rank = 2 heads * 64 = 128), moeTp up to 2, with edge blocks (q_lora 96, kv_lora 64).
_TINY_FP8: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
}
_SMALL: dict[str, Any] = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 6,
    "first_k_dense_replace": 1,
    "n_routed_experts": 32,
    "n_shared_experts": 2,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "num_attention_heads": 8,
    "q_lora_rank": 256,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
}
# The "bench" config of BENCHMARKS.md (3.54 B parameters).
_BENCH: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 12,
    "first_k_dense_replace": 1,
    "n_routed_experts": 32,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 8,
    "topk_group": 4,
    "num_attention_heads": 16,
    "q_lora_rank": 768,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
}


def make_config(
    arch: str = "v3",
    preset: str = "tiny",
    fmt: str = "bf16",
    mtp: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json of a synthesized checkpoint (before quantization_config is added)."""
    if arch not in ("v2", "v3"):
        raise CheckpointError(f"unknown arch {arch!r}; use v2 or v3")
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    cfg: dict[str, Any] = {}
    cfg.update(_V3_COMMON if arch == "v3" else _V2_COMMON)
    cfg.update({"tiny": _TINY, "small": _SMALL, "bench": _BENCH}[preset])
    if arch == "v3" and preset == "bench":
        cfg["rope_scaling"] = None
    if fmt == "fp8" and preset == "tiny":
        cfg.update(_TINY_FP8)
    if arch == "v2":
        cfg["q_lora_rank"] = None
        cfg["n_group"] = cfg["topk_group"] = 1
        if cfg.get("rope_scaling"):
            cfg["rope_scaling"] = dict(cfg["rope_scaling"], mscale=0.707, mscale_all_dim=0.707)
    cfg.update(
        {
            "num_key_value_heads": cfg["num_attention_heads"],
            "num_nextn_predict_layers": 1 if mtp else 0,
            "moe_layer_freq": 1,
            "hidden_act": "silu",
            "initializer_range": INIT_STD,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "tie_word_embeddings": False,
            "use_cache": True,
            "torch_dtype": "bfloat16",
            "dtype": "bfloat16",
        }
    )
    if cfg.get("rope_scaling") is None:
        cfg.pop("rope_scaling", None)
    if overrides:
        cfg.update(overrides)
        if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
            cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg["vocab_size"] < MIN_VOCAB:
        raise CheckpointError(f"vocab_size must be >= {MIN_VOCAB} (the synthetic tokenizer's size)")
    return cfg


def quant_config(fmt: str) -> dict[str, Any] | None:
    if fmt == "fp8":
        return {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        }
    if fmt == "w8a16":
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "ignore": ["lm_head", "re:.*mlp.gate$"],
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "channel",
                        "group_size": None,
                        "dynamic": False,
                    },
                    "input_activations": None,
                    "output_activations": None,
                }
            },
        }
    return None
