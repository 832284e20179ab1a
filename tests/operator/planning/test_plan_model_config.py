"""A malformed llm.dsop.io/model-config annotation (issue 16.4): parsed once by the contract's
parse_model_config, so every malformed value is Validated False InvalidModelConfig with a message
naming the key, before any child: never a crash (RecursionError, TypeError, ZeroDivisionError...)
that leaves no status and is retried forever."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from fake_cluster import NOW, cond

from deepseek_operator.planning import Observed, names, plan

# A tiny V3 that the plan below divides and the 64 GiB devices hold.
GOOD: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 256,
    "vocab_size": 1024,
    "num_attention_heads": 8,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 4096,
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
}

BODY: dict[str, Any] = {
    "apiVersion": "llm.dsop.io/v1alpha1",
    "kind": "DeepSeekDeployment",
    "metadata": {"name": "tiny", "namespace": "llm", "uid": "uid-tiny", "generation": 1},
    "spec": {
        "model": {"source": {"pvc": {"claimName": "models", "path": "tiny"}}},
        "parallelism": {"nodes": 1, "devicesPerNode": 2, "tp": 2, "moeEp": 2},
        "sharding": {"store": {"pvc": {"claimName": "shards"}}},
        "worker": {"image": "reg/dsworker:1", "accelerator": {"type": "npu", "memory": "64Gi"}},
    },
}


def body_with(raw: str) -> dict[str, Any]:
    out = copy.deepcopy(BODY)
    out["metadata"]["annotations"] = {names.MODEL_CONFIG_ANNOTATION: raw}
    return out


def good_with(**changes: Any) -> str:
    cfg = {**GOOD, **changes}
    return json.dumps({k: v for k, v in cfg.items() if v is not _DROP}, allow_nan=True)


_DROP = object()


def _nested(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(depth):
        out = {"a": out}
    return out


# (annotation text, what the message must name)
MALFORMED: dict[str, tuple[str, str]] = {
    # json.loads itself recurses: a RecursionError before the fix.
    "nesting past the parser": (
        good_with()[:-1] + ', "quantization_config": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "quantization_config nested too deeply",
    ),
    "nesting past the limit": (
        good_with(rope_scaling=_nested(20)),
        "rope_scaling.a.a.a",
    ),
    "a size as a string": (good_with(hidden_size="256"), "hidden_size must be an integer"),
    "a size as a float": (good_with(vocab_size=1024.5), "vocab_size must be an integer"),
    "a bool for a count": (good_with(first_k_dense_replace=True), "first_k_dense_replace"),
    "a negative size": (good_with(num_hidden_layers=-2), "num_hidden_layers must be an integer"),
    "a zero divisor": (good_with(n_group=0), "n_group must be an integer in [1"),
    "groups that do not divide": (good_with(n_group=3), "n_group (3) must divide"),
    "a zero head dim": (good_with(qk_rope_head_dim=0), "qk_rope_head_dim"),
    "zero positions": (good_with(max_position_embeddings=0), "max_position_embeddings"),
    "NaN": (good_with(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number"),
    "a string for an object": (good_with(rope_scaling="yarn"), "rope_scaling must be a JSON"),
    "a string factor": (
        good_with(rope_scaling={"type": "yarn", "factor": "40"}),
        "rope_scaling.factor must be a finite number",
    ),
    "a list for an object": (good_with(quantization_config=[1]), "quantization_config must be"),
    "a zero FP8 block": (
        good_with(quantization_config={"quant_method": "fp8", "weight_block_size": [0, 128]}),
        "quantization_config.weight_block_size must be two positive integers",
    ),
    "bits as a string": (
        good_with(
            quantization_config={
                "quant_method": "compressed-tensors",
                "config_groups": {"g": {"weights": {"num_bits": "8"}}},
            }
        ),
        "quantization_config.config_groups.g.weights.num_bits must be an integer",
    ),
    "architectures as a string": (good_with(architectures="DeepseekV3"), "architectures must"),
    "a bad eos id": (good_with(eos_token_id="</s>"), "eos_token_id must be a token id"),
    "a missing size": (good_with(hidden_size=_DROP), "missing or non-integer hidden_size"),
    # Optional to the parser, needed by the memory fit (the devices' memory is known here).
    "a missing MLA size": (good_with(kv_lora_rank=_DROP), "missing kv_lora_rank"),
    # Counted tensor by tensor: this many would hold the operator for minutes.
    "absurd expert count": (good_with(n_routed_experts=65_536), "n_routed_experts (65536)"),
    "not an object": ("[1, 2, 3]", "not a JSON object"),
    "null": ("null", "not a JSON object"),
    "not JSON": ("{nope", "not valid JSON"),
    "a duplicate key": (
        good_with()[:-1] + ', "hidden_size": 512}',
        "duplicate key 'hidden_size'",
    ),
}


def test_the_good_config_is_valid() -> None:
    result = plan(body_with(good_with()), Observed(now=NOW))
    assert cond(result, "Validated")["status"] == "True", result.status.message
    assert result.apply


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_annotation_is_invalid_model_config_naming_the_key(case: str) -> None:
    raw, named = MALFORMED[case]
    result = plan(body_with(raw), Observed(now=NOW))
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InvalidModelConfig"), validated
    assert named in validated["message"]
    assert f"metadata.annotations[{names.MODEL_CONFIG_ANNOTATION}]" in validated["message"]
    assert "remove the annotation" in validated["message"]
    assert result.phase == "Failed" and not result.apply and not result.delete
    assert cond(result, "Sharded")["reason"] == "NotValidated"
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "Failed")]
