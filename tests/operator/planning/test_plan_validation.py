"""The Validated condition (planning/plan.py, planning/validated.py): an invalid spec touches no
child, the model-config annotation is checked and fingerprinted, warnings and refused children
are posted once, a sharder's bad-input exit is a validation failure."""

from __future__ import annotations

import copy
import json
from typing import Any

from fake_cluster import (
    NOW,
    SUMMARY,
    TWO_NODES,
    FakeCluster,
    cond,
)

from deepseek_operator.planning import Observed, names, plan


def test_invalid_spec_fails_without_touching_children() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["parallelism"]["tp"] = 3
    result = plan(body, Observed(now=NOW))
    assert result.phase == "Failed" and not result.apply and not result.delete
    validated = cond(result, "Validated")
    assert validated["status"] == "False" and validated["reason"] == "InvalidSpec"
    assert "spec.parallelism.tp must divide worldSize" in validated["message"]
    assert cond(result, "Sharded")["status"] == "Unknown"
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "Failed")]


TINY_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 256,
    "vocab_size": 1024,
    "num_attention_heads": 8,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "n_routed_experts": 6,
    "n_shared_experts": 1,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 4096,
}


def with_config(body: dict[str, Any], config: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    raw = config if isinstance(config, str) else json.dumps(config)
    out["metadata"]["annotations"] = {names.MODEL_CONFIG_ANNOTATION: raw}
    return out


def test_model_config_annotation_that_does_not_divide() -> None:
    # 6 routed experts over moeEp 4: the operator says so before any Job runs.
    result = plan(with_config(TWO_NODES, TINY_CONFIG), Observed(now=NOW))
    assert result.phase == "Failed" and not result.apply
    validated = cond(result, "Validated")
    assert validated["reason"] == "ConfigMismatch"
    assert "spec.parallelism.moeEp" in validated["message"]
    assert "n_routed_experts" in validated["message"]


def test_model_config_annotation_not_json() -> None:
    result = plan(with_config(TWO_NODES, "{nope"), Observed(now=NOW))
    assert cond(result, "Validated")["reason"] == "InvalidModelConfig"
    assert names.MODEL_CONFIG_ANNOTATION in result.status.message


def test_model_config_annotation_that_fits_is_part_of_the_fingerprint() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["parallelism"] = {"nodes": 1, "devicesPerNode": 2}
    plain = plan(body, Observed(now=NOW))
    fitted = plan(with_config(body, TINY_CONFIG), Observed(now=NOW))
    assert fitted.phase == "Sharding" and cond(fitted, "Validated")["status"] == "True"
    assert fitted.status.fingerprint != plain.status.fingerprint
    # A warning from the config (FP8 on an NPU would be one) is an Event and a condition message.
    fp8 = {**TINY_CONFIG, "quantization_config": {"quant_method": "fp8"}}
    body["spec"]["parallelism"] = {"nodes": 1, "devicesPerNode": 1}
    warned = plan(with_config(body, fp8), Observed(now=NOW))
    assert cond(warned, "Validated")["reason"] == "ValidWithWarnings"
    assert "dequantizeFp8" in cond(warned, "Validated")["message"]
    assert ("Warning", "SpecWarning") in [(e.type, e.reason) for e in warned.events]


def test_spec_warning_is_posted_once() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["expertParallel"] = {"alltoallBufferScaleFactors": [[0, 8.0]]}
    cluster = FakeCluster(body)
    first = cluster.step()
    assert [e.reason for e in first.events] == ["SpecWarning", "Sharding"]
    assert "has no effect with level 1" in cond(first, "Validated")["message"]
    assert cluster.step().events == []


def test_a_child_the_api_server_refuses_is_reported_once() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    cluster.finish_job(cluster.job(), message=json.dumps(SUMMARY))
    why = 'StatefulSet.apps "r1-worker" is invalid: spec.template.spec.tolerations[0].operator'
    refused = {"StatefulSet r1-worker": why}
    result = cluster.step(rejected=refused)
    assert result.phase == "Failed"
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ChildRejected")
    assert "the API server refused StatefulSet r1-worker (fix spec.worker" in validated["message"]
    assert why in validated["message"] and why in result.status.message
    assert cond(result, "Ready")["status"] == "False"
    assert [e.type for e in result.events if e.reason == "ChildRejected"] == ["Warning"]
    again = cluster.step(rejected=refused)
    assert again.phase == "Failed" and not again.events  # reported once, not at every resync
    # The refusal gone (spec fixed, policy relaxed): the planner moves on.
    cluster.run_workers()
    assert cluster.step().phase == "Ready"
    assert cond(cluster.plans[-1], "Validated")["status"] == "True"


def test_a_refused_job_names_the_path_fields() -> None:
    """A hostPath the API server refuses in the sharding Job is spec.model.source's or
    spec.sharding.store's: the hint names them, not only spec.worker."""
    cluster = FakeCluster(TWO_NODES)
    job = names.shard_job("r1", cluster.step().status.fingerprint)
    why = f'Job.batch "{job}" is invalid: spec.template.spec.volumes[0].hostPath.path'
    result = cluster.step(rejected={f"Job {job}": why})
    message = cond(result, "Validated")["message"]
    assert f"the API server refused Job {job} (fix spec.sharding.resources, spec.model.source" in (
        message
    )


def test_sharder_rejecting_the_checkpoint_is_a_validation_failure() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    # Bad input is not retried backoffLimit times: the Job fails on the first exit code 2.
    assert cluster.job()["spec"]["podFailurePolicy"]["rules"] == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "shard", "operator": "In", "values": [2]},
        }
    ]
    msg = "the plan does not divide the model: n_routed_experts 6 % moe_ep 4 != 0"
    cluster.finish_job(cluster.job(), ok=False, message=json.dumps({"error": msg}), code=2)
    result = cluster.step()
    assert result.phase == "Failed"
    assert result.status.message == msg
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"], validated["message"]) == (
        "False",
        "ConfigMismatch",
        msg,
    )
    assert cond(result, "Sharded")["reason"] == "ShardingFailed"
    assert not any(k == "StatefulSet" for k, _ in cluster.objects)
