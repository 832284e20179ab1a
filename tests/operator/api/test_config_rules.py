"""The rules that need the checkpoint's config.json (deepseek_operator.api.config_rules)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deepseek_operator.api import DeepSeekDeploymentSpec, parse_deployment
from deepseek_operator.api.config_rules import (
    UnsupportedQuantization,
    check_against_config,
    detect_quantization,
    resolve_quantization,
    review_config,
)
from spec_cases import load_valid, merge_patch

# The public DeepSeek-V3/R1 config.json (FP8 block-quantised).
V3: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[2] / "data" / "deepseek-v3-config.json").read_text()
)
V3_BF16 = {k: v for k, v in V3.items() if k != "quantization_config"}
V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_attention_heads": 16,
    "vocab_size": 102400,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
}
TINY_V3 = {
    **V3_BF16,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "num_attention_heads": 4,
    "vocab_size": 256,
    "max_position_embeddings": 1024,
}

BASE = {
    "metadata": {"name": "m"},
    "spec": {
        "model": {"source": {"pvc": {"claimName": "models"}}},
        "sharding": {"store": {"pvc": {"claimName": "shards"}}},
    },
}
OFF = {"sharding": {"enabled": False, "store": None}}


def spec(patch: dict[str, Any] | None = None) -> DeepSeekDeploymentSpec:
    result = parse_deployment(merge_patch(BASE, {"spec": patch or {}}))
    assert result.ok, result.errors
    return result.deployment.spec


def plan(nodes: int, per_node: int = 8, **rest: int) -> dict[str, Any]:
    return {"parallelism": {"nodes": nodes, "devicesPerNode": per_node, **rest}}


def has(errors: list[str], *fragments: str) -> bool:
    return any(all(f in e for f in fragments) for e in errors)


def test_mindie_two_node_plan_fits_r1() -> None:
    s = spec(plan(2, dp=2, tp=8, moeTp=4, moeEp=4) | {"model": {"mtp": True}})
    review = review_config(s, V3)
    assert review.errors == []
    assert (review.architecture, review.quantization) == ("DeepseekV3", "fp8")
    assert review.dims is not None and review.dims.n_routed_experts == 256


def test_fp8_shards_must_be_whole_128_blocks() -> None:
    s = spec(plan(4, tp=32, dp=1))
    errors = check_against_config(s, V3)
    assert has(errors, "spec.parallelism.tp", "intermediate_size/tp = 576", "multiple of 128")
    assert has(errors, "spec.parallelism.tp", "n_shared_experts*moe_intermediate_size/tp = 64")
    assert all(e.startswith("spec.parallelism.tp: ") for e in errors), errors
    # Each problem once: check_plan and the operator's own FP8 checks do not both report it.
    assert len([e for e in errors if "/tp = 64 " in e]) == 1, errors
    assert len([e for e in errors if "q_b_proj" in e]) <= 1, errors
    # Dequantised to BF16 the same plan divides fine; so does a BF16 checkpoint.
    assert check_against_config(spec(plan(4, tp=32) | {"model": {"dequantizeFp8": True}}), V3) == []
    assert check_against_config(s, V3_BF16) == []


def test_fp8_attention_split_of_one_head_is_not_a_block_multiple() -> None:
    errors = check_against_config(spec(plan(16, tp=128)), V3)
    assert has(errors, "spec.parallelism.tp", "q_b_proj rows", "= 192 is not a multiple of 128")
    assert len([e for e in errors if "q_b_proj" in e]) == 1, errors  # once, not twice
    # Without the MLA head dims in config.json the operator checks DeepSeek's defaults itself.
    bare = {k: v for k, v in V3.items() if not k.endswith("_head_dim")}
    errors = check_against_config(spec(plan(16, tp=128)), bare)
    assert len([e for e in errors if "q_b_proj" in e and "= 192 " in e]) == 1, errors


def test_heads_and_vocab_must_divide_by_tp() -> None:
    s = spec(plan(1, 3) | OFF)
    errors = check_against_config(s, V2_LITE)
    assert has(errors, "spec.parallelism.tp", "num_attention_heads (16)")
    assert has(errors, "spec.parallelism.tp", "vocab_size (102400)")


def test_expert_intermediate_must_divide_by_moe_tp() -> None:
    errors = check_against_config(spec(plan(1, 3, tp=1, moeTp=3) | OFF), V2_LITE)
    assert has(errors, "spec.parallelism.moeTp", "moe_intermediate_size")


def test_experts_must_divide_by_moe_ep() -> None:
    errors = check_against_config(spec(plan(16, 8, tp=8) | OFF), V2_LITE)
    assert has(errors, "spec.parallelism.moeEp", "n_routed_experts (64)")


def test_v2_read_from_config_cannot_shard_offline() -> None:
    errors = check_against_config(spec(plan(1, 4)), V2_LITE)
    assert has(errors, "spec.sharding.enabled", "config.json describes DeepseekV2")
    assert check_against_config(spec(plan(1, 4) | OFF), V2_LITE) == []


def test_given_architecture_must_match_config() -> None:
    errors = check_against_config(spec({"model": {"architecture": "DeepseekV3"}} | OFF), V2_LITE)
    assert has(errors, "spec.model.architecture is DeepseekV3 but config.json describes DeepseekV2")


def test_mtp_needs_an_mtp_layer() -> None:
    errors = check_against_config(spec({"model": {"mtp": True}} | OFF), V2_LITE)
    assert has(errors, "spec.model.mtp", "no MTP layer")
    assert check_against_config(spec({"model": {"mtp": True}}), V3) == []


def test_given_quantization_must_match_the_checkpoint() -> None:
    errors = check_against_config(spec({"model": {"quantization": "bf16"}}), V3)
    assert has(errors, "spec.model.quantization is bf16 but the checkpoint is fp8")
    assert check_against_config(spec({"model": {"quantization": "fp8"}}), V3) == []


def test_unsupported_quantization_is_an_error_not_a_crash() -> None:
    cfg = {**V3, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    errors = check_against_config(spec(), cfg)
    assert has(errors, "spec.model.quantization", "gptq", "not supported")


def test_max_seq_len_within_position_embeddings() -> None:
    s = spec({"serving": {"maxSeqLen": 4096, "maxInputTokenLen": 1024}, "parallelism": {"tp": 4}})
    assert has(check_against_config(s, TINY_V3), "spec.serving.maxSeqLen (4096)", "(1024)")


@pytest.mark.parametrize(
    "cfg", [{"architectures": ["LlamaForCausalLM"]}, {**V3, "vocab_size": None}]
)
def test_a_config_that_is_not_deepseek(cfg: dict[str, Any]) -> None:
    errors = check_against_config(spec(), cfg)
    assert len(errors) == 1 and errors[0].startswith("spec.model.source: config.json")


def test_a_config_that_is_not_an_object() -> None:
    assert check_against_config(spec(), ["not", "a", "dict"]) == [  # type: ignore[arg-type]
        "spec.model.source: config.json: not a JSON object (config.json must be one)"
    ]


CT_W8A16 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
            "input_activations": None,
        }
    },
    "ignore": ["lm_head", "re:.*mlp.gate$"],
}
CT_W8A8 = {
    **CT_W8A16,
    "format": "int-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "int", "dynamic": True},
        }
    },
}
CT_W4 = {
    **CT_W8A16,
    "config_groups": {"group_0": {"weights": {"num_bits": 4}, "input_activations": None}},
}


@pytest.mark.parametrize(
    "cfg,files,expected",
    [
        (V3, (), "fp8"),
        (V3_BF16, (), "bf16"),
        ({**V3_BF16, "quantization_config": CT_W8A16}, (), "w8a16"),
        ({**V3_BF16, "quantization_config": CT_W8A8}, (), "w8a8"),
        ({**V3_BF16, "quantize": "w8a8_dynamic"}, (), "w8a8"),
        (V3_BF16, ("quant_model_description_w8a8_dynamic.json",), "w8a8"),
        (V3_BF16, ("quant_model_description_w8a16.json",), "w8a16"),
    ],
)
def test_detect_quantization(cfg: dict[str, Any], files: tuple[str, ...], expected: str) -> None:
    assert detect_quantization(cfg, files) == expected


@pytest.mark.parametrize(
    "qc", [CT_W4, {"quant_method": "awq"}, {"quant_method": "compressed-tensors"}]
)
def test_detect_quantization_rejects_what_the_engine_cannot_run(qc: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedQuantization):
        detect_quantization({**V3_BF16, "quantization_config": qc})


def test_resolve_quantization() -> None:
    assert resolve_quantization(spec(), V3) == "fp8"
    assert resolve_quantization(spec({"model": {"quantization": "w8a8"}}), V3_BF16) == "w8a8"
    review = review_config(spec({"model": {"quantization": "auto"}}), V3_BF16, ["x_w8a16.json"])
    assert review.quantization == "w8a16"


def test_config_warnings() -> None:
    review = review_config(spec({"model": {"dequantizeFp8": True}}), V3_BF16)
    assert review.errors == [] and has(review.warnings, "dequantizeFp8 has no effect")
    npu = review_config(spec(), V3)
    assert has(npu.warnings, "spec.model.dequantizeFp8", "npu has no FP8")
    assert review_config(spec({"worker": {"accelerator": {"type": "gpu"}}}), V3).warnings == []
    assert review_config(spec({"model": {"dequantizeFp8": True}}), V3).warnings == []


CONFIG_FOR_EXAMPLE = {
    "minimal": V3,
    "r1-two-nodes-pvc-store": V3,
    "r1-a3-hostpath-store": V3,
    "v3-level2-buffer-factors": {
        **V3_BF16,
        "quantize": "w8a8_dynamic",
    },
    "v3-level1-cutoff": V3,
    "v3-gpu-fp8": V3,
    "tiny-cpu": TINY_V3,
    "v2-lite-no-sharding": V2_LITE,
}


@pytest.mark.parametrize("name,obj", load_valid(), ids=[n for n, _ in load_valid()])
def test_valid_examples_fit_their_checkpoints(name: str, obj: dict[str, Any]) -> None:
    result = parse_deployment(obj)
    assert result.ok, result.errors
    assert check_against_config(result.deployment.spec, CONFIG_FOR_EXAMPLE[name]) == []
