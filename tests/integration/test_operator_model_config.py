"""A malformed llm.dsop.io/model-config annotation through a real API server and the operator
(issue 16.4): the planner used to crash on it (a RecursionError here), leaving no status and
retrying forever. Now it is Validated False InvalidModelConfig naming the key, and fixing the
annotation lets the same object go on to shard."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from conftest import GROUP, PLURAL, VERSION, Dsd, OperatorProcess
from deepseek_operator.planning import names

pytestmark = pytest.mark.integration

TINY: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 256,
    "vocab_size": 1024,
    "num_attention_heads": 8,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "n_routed_experts": 8,
    "n_group": 2,
    "topk_group": 1,
    "max_position_embeddings": 4096,
}
# Deeper than json.loads can recurse: a RecursionError in the planner before the fix.
TOO_DEEP = json.dumps(TINY)[:-1] + ', "rope_scaling": ' + "[" * 10_000 + "]" * 10_000 + "}"


def deployment(annotation: str) -> dict[str, Any]:
    return {
        "apiVersion": "llm.dsop.io/v1alpha1",
        "kind": "DeepSeekDeployment",
        "metadata": {"name": "tiny", "annotations": {names.MODEL_CONFIG_ANNOTATION: annotation}},
        "spec": {
            "model": {"source": {"pvc": {"claimName": "models", "path": "tiny"}}},
            "parallelism": {"nodes": 1, "devicesPerNode": 2, "tp": 2, "moeEp": 2},
            "sharding": {"store": {"pvc": {"claimName": "shards"}}},
            "worker": {"image": "dsworker:test", "accelerator": {"type": "npu"}},
        },
    }


def annotate(dsd: Dsd, raw: str) -> None:
    patch = {"metadata": {"annotations": {names.MODEL_CONFIG_ANNOTATION: raw}}}
    dsd.objects.patch_namespaced_custom_object(GROUP, VERSION, dsd.namespace, PLURAL, "tiny", patch)


def test_a_malformed_annotation_gets_a_condition_naming_the_key(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(deployment(TOO_DEEP))
    status = dsd.wait_phase("tiny", "Failed")
    validated = dsd.condition("tiny", "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InvalidModelConfig")
    assert "rope_scaling nested too deeply" in validated["message"]
    assert names.MODEL_CONFIG_ANNOTATION in status["message"]
    # A zero divisor, once the annotation changes: named too.
    annotate(dsd, json.dumps({**TINY, "n_group": 0}))
    dsd.wait(
        "the n_group message",
        lambda: "n_group must be an integer" in dsd.condition("tiny", "Validated")["message"],
    )
    time.sleep(1)
    assert dsd.jobs() == []
    # Fixed: the same object goes on to shard.
    annotate(dsd, json.dumps(TINY))
    dsd.wait("the sharding Job", lambda: dsd.jobs("sharder"))
    dsd.wait("Validated True", lambda: dsd.condition("tiny", "Validated").get("status") == "True")
