"""Every rule of the API: an accepted and a rejected object each, plus defaults and warnings."""

from __future__ import annotations

from typing import Any

import pytest

from deepseek_operator.api import (
    DEFAULT_WORKER_IMAGE,
    DeepSeekDeploymentSpec,
    DeepSeekDeploymentStatus,
    Parallelism,
    json_path,
    parse_deployment,
    spec_warnings,
)
from dsworker.contract.layout import ParallelPlan
from runtime_cases import RUNTIME_RULE_CASES
from spec_cases import all_rules, load_valid, merge_patch

BASE: dict[str, Any] = {
    "apiVersion": "llm.dsop.io/v1alpha1",
    "kind": "DeepSeekDeployment",
    "metadata": {"name": "r1", "namespace": "llm"},
    "spec": {
        "model": {"source": {"pvc": {"claimName": "models", "path": "DeepSeek-R1"}}},
        "sharding": {"store": {"pvc": {"claimName": "shards"}}},
    },
}
HOST_STORE = {"store": {"pvc": None, "hostPath": {"path": "/dev/shm/dsd"}}}
PIN = {"nodeSelector": {"kubernetes.io/hostname": "n1"}}
NO_SHARDING = {"enabled": False, "store": None}


def _node_affinity(requirement: dict[str, Any]) -> dict[str, Any]:
    terms = [{"matchExpressions": [requirement]}]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
        }
    }


def _pod_anti_affinity(requirement: dict[str, Any]) -> dict[str, Any]:
    term = {
        "labelSelector": {"matchExpressions": [requirement]},
        "topologyKey": "kubernetes.io/hostname",
    }
    return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}


def parse(spec_patch: dict[str, Any]):
    return parse_deployment(merge_patch(BASE, {"spec": spec_patch}))


# rule name -> (a spec patch it accepts, a spec patch it rejects)
RULE_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "world-size": (
        {"parallelism": {"nodes": 2, "worldSize": 16}},
        {"parallelism": {"nodes": 2, "worldSize": 8}},
    ),
    "dp-divides-world": ({"parallelism": {"dp": 4}}, {"parallelism": {"dp": 3}}),
    "tp-divides-world": ({"parallelism": {"tp": 2}}, {"parallelism": {"tp": 5}}),
    "dp-times-tp": (
        {"parallelism": {"nodes": 2, "dp": 2, "tp": 8}},
        {"parallelism": {"nodes": 2, "dp": 4, "tp": 8}},
    ),
    "moeTp-divides-world": ({"parallelism": {"moeTp": 8}}, {"parallelism": {"moeTp": 6}}),
    "moeEp-divides-world": ({"parallelism": {"moeEp": 4}}, {"parallelism": {"moeEp": 7}}),
    "moeTp-times-moeEp": (
        {"parallelism": {"devicesPerNode": 16, "moeTp": 4, "moeEp": 4}},
        {"parallelism": {"devicesPerNode": 16, "moeTp": 4, "moeEp": 8}},
    ),
    "topk-needs-enabled": (
        {"expertParallel": {"initRoutingCutoff": {"enabled": True, "topkScalingFactor": 1}}},
        {"expertParallel": {"initRoutingCutoff": {"topkScalingFactor": 0.25}}},
    ),
    "cutoff-level-1": (
        {"expertParallel": {"level": 1, "initRoutingCutoff": {"enabled": True}}},
        {"expertParallel": {"level": 2, "initRoutingCutoff": {"enabled": True}}},
    ),
    "topk-level-1": (
        {"expertParallel": {"initRoutingCutoff": {"enabled": True, "topkScalingFactor": 0.5}}},
        {
            "expertParallel": {
                "level": 2,
                "initRoutingCutoff": {"enabled": True, "topkScalingFactor": 0.5},
            }
        },
    ),
    "buffer-factor-pairs": (
        {"expertParallel": {"level": 2, "alltoallBufferScaleFactors": [[0, 0.01]]}},
        {"expertParallel": {"level": 2, "alltoallBufferScaleFactors": [[10.5, 1.0]]}},
    ),
    "buffer-factors-descending": (
        {"expertParallel": {"level": 2, "alltoallBufferScaleFactors": [[9, 1], [8, 2], [0, 3]]}},
        {"expertParallel": {"level": 2, "alltoallBufferScaleFactors": [[9, 1], [0, 3], [8, 2]]}},
    ),
    "direct-level-2-multinode": (
        {"parallelism": {"nodes": 2}, "expertParallel": {"level": 1, "interconnect": "direct"}},
        {"parallelism": {"nodes": 2}, "expertParallel": {"level": 2, "interconnect": "direct"}},
    ),
    "expert-merge-sharding": (
        {"features": {"expertMerge": True}, "sharding": NO_SHARDING},
        {"features": {"expertMerge": True}},
    ),
    "dlb-sharding": (
        {"features": {"dynamicLoadBalancing": True}, "sharding": NO_SHARDING},
        {"features": {"dynamicLoadBalancing": True}},
    ),
    "v2-no-offline-sharding": (
        {"model": {"architecture": "DeepseekV2"}, "sharding": NO_SHARDING},
        {"model": {"architecture": "DeepseekV2"}},
    ),
    "host-path-store-nodes": (
        {"sharding": HOST_STORE, "worker": PIN},
        {"sharding": HOST_STORE, "worker": PIN, "parallelism": {"nodes": 2}},
    ),
    "trust-remote-code": (
        {"model": {"trustRemoteCode": False}},
        {"model": {"trustRemoteCode": True}},
    ),
    "v2-mtp": (
        {"model": {"architecture": "DeepseekV3", "mtp": True}},
        {"model": {"architecture": "DeepseekV2", "mtp": True}, "sharding": NO_SHARDING},
    ),
    "model-source-one": (
        {"model": {"source": {"pvc": None, "hostPath": {"path": "/models/r1"}}}},
        {"model": {"source": {"hostPath": {"path": "/models/r1"}}}},
    ),
    "input-below-seq": (
        {"serving": {"maxSeqLen": 2049, "maxInputTokenLen": 2048}},
        {"serving": {"maxSeqLen": 1024}},
    ),
    "store-required": ({"sharding": NO_SHARDING}, {"sharding": {"store": None}}),
    "store-one": (
        {"sharding": HOST_STORE, "worker": PIN},
        {"sharding": {"store": {"hostPath": {"path": "/dev/shm/dsd"}}}, "worker": PIN},
    ),
    "store-pvc-shape": (
        {
            "sharding": {
                "store": {"pvc": {"claimName": None, "storageClassName": "x", "size": "1Ti"}}
            }
        },
        {"sharding": {"store": {"pvc": {"storageClassName": "x"}}}},
    ),
    "env-value-or-value-from": (
        {"worker": {"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]}},
        {"worker": {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {}}}]}},
    ),
    "env-names-unique": (
        {"worker": {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "1"}]}},
        {"worker": {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}},
    ),
    "model-pvc-path": (
        {"model": {"source": {"pvc": {"claimName": "models", "path": "a/..b/.c/"}}}},
        {"model": {"source": {"pvc": {"claimName": "models", "path": "r1/../../etc"}}}},
    ),
    "model-host-path": (
        {"model": {"source": {"pvc": None, "hostPath": {"path": "/data/usr/lib/r1"}}}},
        {"model": {"source": {"pvc": None, "hostPath": {"path": "/usr/share/r1"}}}},
    ),
    "store-host-path": (
        {"sharding": HOST_STORE, "worker": PIN},
        {"sharding": {"store": {"pvc": None, "hostPath": {"path": "/"}}}, "worker": PIN},
    ),
    "port-not-reserved": ({"serving": {"port": 8000}}, {"serving": {"port": 29500}}),
    "node-selector-keys": (
        {"worker": {"nodeSelector": {"example.com/pool": "npu-a"}}},
        {"worker": {"nodeSelector": {"pool name": "npu-a"}}},
    ),
    "toleration-exists-no-value": (
        {"worker": {"tolerations": [{"key": "npu", "operator": "Exists"}]}},
        {"worker": {"tolerations": [{"key": "npu", "operator": "Exists", "value": "yes"}]}},
    ),
    "toleration-empty-key-exists": (
        {"worker": {"tolerations": [{"operator": "Exists"}]}},
        {"worker": {"tolerations": [{"value": "yes"}]}},
    ),
    "toleration-seconds-no-execute": (
        {"worker": {"tolerations": [{"key": "k", "effect": "NoExecute", "tolerationSeconds": 9}]}},
        {"worker": {"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 9}]}},
    ),
    "nodeSelectorRequirement-values": (
        {"worker": {"affinity": _node_affinity({"key": "gen", "operator": "Gt", "values": ["2"]})}},
        {"worker": {"affinity": _node_affinity({"key": "gen", "operator": "In"})}},
    ),
    "labelSelectorRequirement-values": (
        {"worker": {"affinity": _pod_anti_affinity({"key": "app", "operator": "Exists"})}},
        {
            "worker": {
                "affinity": _pod_anti_affinity(
                    {"key": "app", "operator": "Exists", "values": ["x"]}
                )
            }
        },
    ),
    **RUNTIME_RULE_CASES,
}
# Rules of the object itself: rule name -> (an object patch it accepts, one it rejects).
OBJECT_RULE_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "name-not-ranks": (
        {"metadata": {"name": "r1-rank"}},
        {"metadata": {"name": "r1-ranks"}},
    ),
}


def parse_case(name: str, which: int):
    if name in OBJECT_RULE_CASES:
        return parse_deployment(merge_patch(BASE, OBJECT_RULE_CASES[name][which]))
    return parse(RULE_CASES[name][which])


def test_every_rule_has_cases() -> None:
    assert set(RULE_CASES) | set(OBJECT_RULE_CASES) == set(all_rules())


@pytest.mark.parametrize("name", sorted([*RULE_CASES, *OBJECT_RULE_CASES]))
def test_rule_accepts(name: str) -> None:
    result = parse_case(name, 0)
    assert result.ok, result.errors


@pytest.mark.parametrize("name", sorted([*RULE_CASES, *OBJECT_RULE_CASES]))
def test_rule_rejects_with_its_message(name: str) -> None:
    result = parse_case(name, 1)
    assert not result.ok
    assert all_rules()[name].message in result.errors, result.errors


def test_rule_messages_name_a_field_and_a_fix() -> None:
    for rule in all_rules().values():
        assert rule.message.startswith(("spec.", "metadata.")), rule.name
        assert any(
            w in rule.message for w in ("set ", "remove", "use ", "lower", "choose", "e.g.")
        ), rule.name


def test_second_host_path_store_rule_needs_a_node_selector() -> None:
    result = parse({"sharding": HOST_STORE})
    assert not result.ok
    assert all_rules()["host-path-store-nodes"].message in result.errors
    assert not parse({"sharding": HOST_STORE, "worker": {"nodeSelector": {}}}).ok


def test_host_path_store_node_list_has_one_node_per_pod() -> None:
    def store(nodes: list[str]) -> dict[str, Any]:
        return {"store": {"pvc": None, "hostPath": {"path": "/dev/shm/d", "nodes": nodes}}}

    assert parse({"sharding": store(["a", "b"]), "parallelism": {"nodes": 2}}).ok
    result = parse({"sharding": store(["a"]), "parallelism": {"nodes": 2}})
    assert all_rules()["host-path-store-nodes"].message in result.errors


def test_failed_rules_of_one_object_are_all_reported() -> None:
    result = parse(
        {
            "expertParallel": {
                "level": 2,
                "initRoutingCutoff": {"enabled": True, "topkScalingFactor": 1},
            }
        }
    )
    rules = all_rules()
    assert rules["cutoff-level-1"].message in result.errors
    assert rules["topk-level-1"].message in result.errors


@pytest.mark.parametrize("name,obj", load_valid(), ids=[n for n, _ in load_valid()])
def test_valid_examples_parse(name: str, obj: dict[str, Any]) -> None:
    result = parse_deployment(obj)
    assert result.ok, (name, result.errors)
    assert result.warnings == []
    # What the operator derives parses again to the same thing.
    again = parse_deployment(result.deployment.to_dict())
    assert again.ok and again.deployment == result.deployment


def test_defaults() -> None:
    spec = parse({}).deployment.spec
    assert spec.model.name == "r1"
    assert spec.model.quantization == "auto"
    assert not spec.model.trust_remote_code
    p = spec.parallelism
    assert (p.nodes, p.devices_per_node, p.world_size, p.dp, p.tp, p.moe_tp, p.moe_ep) == (
        1,
        8,
        8,
        1,
        8,
        1,
        8,
    )
    ep = spec.expert_parallel
    assert (ep.level, ep.grouped_matmul, ep.interconnect) == (1, "auto", "switch")
    assert not ep.init_routing_cutoff.enabled and ep.alltoall_buffer_scale_factors is None
    sh = spec.sharding
    assert (
        sh.enabled and sh.stage_to_tmpfs and sh.processes == 8 and sh.image == DEFAULT_WORKER_IMAGE
    )
    assert not spec.features.expert_merge and not spec.features.dynamic_load_balancing
    sv = spec.serving
    assert (sv.max_seq_len, sv.max_input_token_len, sv.truncation, sv.port) == (
        2560,
        2048,
        False,
        1025,
    )
    assert (sv.cpu_mem_size, sv.npu_mem_size) == (5, -1)
    assert (sv.cuda_graphs, sv.torch_compile) == (True, False)
    w = spec.worker
    assert w.image == DEFAULT_WORKER_IMAGE and w.restart_budget == 5
    assert w.accelerator.type == "npu" and w.accelerator.resource_name == "huawei.com/Ascend910"


@pytest.mark.parametrize(
    "given,expected",
    [
        ({}, (1, 8, 1, 8)),
        ({"dp": 2}, (2, 4, 1, 8)),
        ({"tp": 2}, (4, 2, 1, 8)),
        ({"moeTp": 2}, (1, 8, 2, 4)),
        ({"moeEp": 2}, (1, 8, 4, 2)),
        ({"dp": 8, "moeTp": 8}, (8, 1, 8, 1)),
    ],
)
def test_parallel_defaults_complete_the_plan(given: dict[str, int], expected: tuple) -> None:
    p = parse({"parallelism": given}).deployment.spec.parallelism
    assert (p.dp, p.tp, p.moe_tp, p.moe_ep) == expected
    assert p.to_plan() == ParallelPlan(8, *expected)


def test_sharder_processes_default_is_capped() -> None:
    assert parse({"parallelism": {"devicesPerNode": 4}}).deployment.spec.sharding.processes == 4
    big = parse({"parallelism": {"nodes": 4}}).deployment.spec
    assert big.sharding.processes == 8
    assert parse({"sharding": {"processes": 3}}).deployment.spec.sharding.processes == 3


@pytest.mark.parametrize(
    "accel,resource",
    [("npu", "huawei.com/Ascend910"), ("gpu", "nvidia.com/gpu"), ("cpu", None)],
)
def test_accelerator_resource_defaults(accel: str, resource: str | None) -> None:
    spec = parse({"worker": {"accelerator": {"type": accel}}}).deployment.spec
    assert spec.worker.accelerator.resource_name == resource


def test_given_names_are_kept() -> None:
    spec = parse(
        {
            "model": {"name": "DeepSeek-R1"},
            "worker": {"image": "w:1", "accelerator": {"type": "gpu", "resourceName": "x.io/gpu"}},
            "sharding": {"image": "s:1"},
        }
    ).deployment.spec
    assert spec.model.name == "DeepSeek-R1"
    assert (spec.worker.image, spec.sharding.image) == ("w:1", "s:1")
    assert spec.worker.accelerator.resource_name == "x.io/gpu"


def test_buffer_factors_become_int_float_pairs() -> None:
    ep = parse(
        {"expertParallel": {"level": 2, "alltoallBufferScaleFactors": [[8192.0, 5], [0, 8.0]]}}
    ).deployment.spec.expert_parallel
    assert ep.alltoall_buffer_scale_factors == [(8192, 5.0), (0, 8.0)]
    assert isinstance(ep.alltoall_buffer_scale_factors[0][0], int)


def test_grouped_matmul_auto_turns_on_above_32_experts_groups() -> None:
    ep = parse({}).deployment.spec.expert_parallel
    assert not ep.grouped_matmul_on(32) and ep.grouped_matmul_on(64)
    off = parse({"expertParallel": {"groupedMatmul": "off"}}).deployment.spec.expert_parallel
    assert not off.grouped_matmul_on(64)


def test_warnings() -> None:
    cases = {
        "alltoallBufferScaleFactors has no effect with level 1": {
            "expertParallel": {"alltoallBufferScaleFactors": [[0, 8.0]]}
        },
        "spec.sharding.store has no effect": {"sharding": {"enabled": False}},
        "spec.sharding.stageToTmpfs has no effect": {
            "sharding": {**HOST_STORE, "stageToTmpfs": True},
            "worker": PIN,
        },
        "spec.model.dequantizeFp8 has no effect": {
            "model": {"quantization": "w8a8", "dequantizeFp8": True}
        },
        "resourceName is ignored for type cpu": {
            "worker": {"accelerator": {"type": "cpu", "resourceName": "x.io/y"}}
        },
        "spec.serving.speculativeTokens has no effect while spec.model.mtp is false": {
            "serving": {"speculativeTokens": 2}
        },
    }
    for fragment, patch in cases.items():
        result = parse(patch)
        assert result.ok, result.errors
        assert any(fragment in w for w in result.warnings), (fragment, result.warnings)
        assert spec_warnings(result.deployment.spec) == result.warnings
    assert parse({"sharding": HOST_STORE, "worker": PIN}).warnings == []
    # The API server writes the default 1 into every object: that is no setting to warn about.
    assert parse({"serving": {"speculativeTokens": 1}}).warnings == []


@pytest.mark.parametrize("garbage", [None, 3, "spec", [], {"spec": []}, {"spec": {"model": 1}}])
def test_parse_never_raises(garbage: Any) -> None:
    result = parse_deployment(garbage)
    assert not result.ok and result.errors


def test_error_paths_use_json_names_and_indexes() -> None:
    result = parse(
        {"expertParallel": {"level": 2, "alltoallBufferScaleFactors": [[1, 1.0], ["x", 1.0]]}}
    )
    assert any(
        e.startswith("spec.expertParallel.alltoallBufferScaleFactors[1][0]:") for e in result.errors
    ), result.errors
    assert json_path(("spec", "a", 0, "b", 1)) == "spec.a[0].b[1]"


def test_wrong_kind_is_rejected() -> None:
    result = parse_deployment({**BASE, "kind": "Deployment"})
    assert any(e.startswith("kind:") for e in result.errors), result.errors


def test_status_is_ignored_by_parse_and_read_tolerantly() -> None:
    obj = {**BASE, "status": {"phase": "Nonsense"}}
    assert parse_deployment(obj).ok
    status = DeepSeekDeploymentStatus.model_validate(
        {
            "phase": "Ready",
            "readyWorkers": "2/2",
            "worldSize": 16,
            "shards": {"bytes": 10, "throughputMBps": 512.5},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "WorkersReady",
                    "lastTransitionTime": "2025-01-02T03:04:05Z",
                }
            ],
            "fromAnOlderOperator": 1,
        }
    )
    out = status.to_dict()
    assert out["shards"]["throughputMBps"] == 512.5
    assert out["conditions"][0]["lastTransitionTime"] == "2025-01-02T03:04:05Z"
    assert "fromAnOlderOperator" not in out


def test_models_build_by_python_name() -> None:
    p = Parallelism(nodes=2, devices_per_node=8, moe_tp=2)
    assert (p.world_size, p.moe_ep) == (16, 8)
    spec = DeepSeekDeploymentSpec.model_validate(BASE["spec"])
    assert spec.parallelism.tp == 8
