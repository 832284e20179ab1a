"""spec.runtime wired into the children: the engine ConfigMap carries each engine's own file, the
worker pods run its container (image, command, args, env, probes, volumes), the staging init
container fits the runtime, and status.runtime says which engine serves, also while an old group
keeps serving after a runtime change."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from fake_cluster import TWO_NODES, FakeCluster, cond

from deepseek_operator.api import parse_deployment
from deepseek_operator.planning import names, objects
from recorded_formats import mindie_config_errors, vllm_args_errors

MINDIE_PATCH: dict[str, Any] = {
    "runtime": {"engine": "mindie", "image": "reg/mindie:2.1", "rankTableConfigMap": "r1-rt"},
    "parallelism": {"nodes": 2, "devicesPerNode": 8, "dp": 2, "tp": 8, "moeTp": 1},
    "worker": {"accelerator": {"type": "npu"}},
}
VLLM_PATCH: dict[str, Any] = {
    "runtime": {"engine": "vllm"},
    "parallelism": {"nodes": 2, "devicesPerNode": 8, "dp": 2, "tp": 8, "moeTp": 1},
    "sharding": {"enabled": False, "store": None},
    "worker": {"accelerator": {"type": "gpu"}},
}


def body(patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(TWO_NODES)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out["spec"].get(key), dict):
            out["spec"][key] = {**out["spec"][key], **value}
        else:
            out["spec"][key] = value
    out["spec"]["sharding"] = {k: v for k, v in out["spec"]["sharding"].items() if v is not None}
    return out


def context(obj: dict[str, Any]) -> objects.Context:
    result = parse_deployment(obj)
    assert result.ok, result.errors
    return objects.Context(result.deployment, "uid-r1", "a" * 64, 1)


def engine(sts: dict[str, Any]) -> dict[str, Any]:
    return sts["spec"]["template"]["spec"]["containers"][0]


def test_mindie_config_map_and_pods() -> None:
    ctx = context(body(MINDIE_PATCH))
    cm = objects.engine_config_map(ctx)
    assert list(cm["data"]) == ["config.json"]
    text = cm["data"]["config.json"]
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert cm["metadata"]["annotations"][names.ENGINE_CONFIG_ANNOTATION] == digest
    assert mindie_config_errors(json.loads(text), multi_node=True) == []
    model = json.loads(text)["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0]
    assert model["modelWeightPath"] == "/model"  # the pvc store's shards, staged

    sts = objects.statefulset(ctx, digest, 10**12)
    pod = sts["spec"]["template"]["spec"]
    container = engine(sts)
    assert sts["metadata"]["annotations"][names.RUNTIME_ANNOTATION] == "mindie"
    assert container["image"] == "reg/mindie:2.1" and container["args"] == []
    env = {e["name"]: e for e in container["env"]}
    assert env["HCCL_CONNECT_TIMEOUT"]["value"] == "1200"  # spec.worker.env merged in
    assert env["MIES_CONFIG_JSON_PATH"]["value"] == "/etc/dsworker/config.json"
    assert "MASTER_ADDR" not in env
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["engine-config"]["configMap"]["defaultMode"] == 0o640
    assert volumes["rank-table"]["configMap"]["name"] == "r1-rt"
    assert {"name": "rank-table", "mountPath": "/etc/mindie/ranktable", "readOnly": True} in (
        container["volumeMounts"]
    )
    stage = pod["initContainers"][0]
    assert stage["image"] == "reg/dsworker:1" and stage["args"][0] == "stage"
    assert container["resources"]["limits"]["huawei.com/Ascend910"] == "8"
    assert "/v2/health/ready" in container["readinessProbe"]["exec"]["command"]


def test_vllm_config_map_and_pods_stage_the_checkpoint() -> None:
    ctx = context(body(VLLM_PATCH))
    cm = objects.engine_config_map(ctx)
    assert list(cm["data"]) == ["vllm-args.json"]
    sts = objects.statefulset(ctx, "d", None)
    pod = sts["spec"]["template"]["spec"]
    container = engine(sts)
    assert container["image"] == "vllm/vllm-openai:v0.13.0"
    assert container["args"] == json.loads(cm["data"]["vllm-args.json"])["args"]
    assert container["args"][0] == "/model"
    assert vllm_args_errors(container["args"], "gpu") == []
    stage = pod["initContainers"][0]
    assert stage["image"] == "reg/dsworker:1"
    assert stage["args"] == [
        "stage-checkpoint",
        "--source",
        "/source/DeepSeek-R1",
        "--dest",
        "/model",
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"] == {"name": "model", "emptyDir": {"medium": "Memory"}}
    assert volumes["source"]["persistentVolumeClaim"]["readOnly"] is True
    assert "defaultMode" not in volumes["engine-config"]["configMap"]
    assert {"name": "model", "mountPath": "/model", "readOnly": True} in container["volumeMounts"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_vllm_without_staging_loads_the_checkpoint_in_place() -> None:
    patch = copy.deepcopy(VLLM_PATCH)
    patch["sharding"]["stageToTmpfs"] = False
    sts = objects.statefulset(context(body(patch)), "d", None)
    assert "initContainers" not in sts["spec"]["template"]["spec"]
    assert engine(sts)["args"][0] == "/source/DeepSeek-R1"


def test_status_says_which_runtime_serves_and_the_old_one_while_it_still_does() -> None:
    cluster = FakeCluster(body({"worker": {"accelerator": {"type": "npu"}}}))
    result = cluster.until_ready()
    assert result.status.runtime == "dsworker"
    del cluster.sts()["metadata"]["annotations"][names.RUNTIME_ANNOTATION]  # an older operator's
    cluster.change_spec(
        {
            "runtime": {"engine": "mindie", "image": "reg/mindie:2.1", "rankTableConfigMap": "rt"},
            "parallelism": {"moeTp": 1},
        }
    )
    result = cluster.step()  # a new plan: new shards while the dsworker group keeps serving
    assert result.phase == "Sharding" and result.status.runtime == "dsworker"
    assert cond(result, "Ready")["status"] == "True"
    result = cluster.until_ready()
    for _ in range(6):  # the group rolls to the new template: all pods replaced together
        if result.phase == "Ready":
            break
        cluster.run_workers()
        result = cluster.step()
    assert result.phase == "Ready" and result.status.runtime == "mindie"
    assert engine(cluster.sts())["image"] == "reg/mindie:2.1"
