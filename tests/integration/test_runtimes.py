"""MindIE and vLLM on a real control plane with kwok nodes: a mindie CR on 2 x 8 NPUs and a vllm CR
on 2 x 8 GPUs reach Ready with the engine ConfigMap and container arguments the recorded formats
accept, status says which runtime serves, and the API server refuses a field the runtime cannot
honour with a message naming the field and the runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from test_operator import deployment, sts_of, worker_pods

from conftest import Dsd, OperatorProcess
from recorded_formats import mindie_config_errors, vllm_args_errors

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RANK_TABLE = REPO / "tests" / "data" / "formats" / "examples" / "hccl_rank_table.two_node.json"
NPU, GPU = "huawei.com/Ascend910", "nvidia.com/gpu"
TWO_BY_EIGHT = {"nodes": 2, "devicesPerNode": 8, "dp": 2, "tp": 8, "moeTp": 1}


def env_of(container: Any) -> dict[str, Any]:
    return {e.name: e for e in container.env}


def test_mindie_on_two_npu_nodes_reaches_ready(
    running_operator: OperatorProcess, dsd: Dsd, kube_cluster: Any
) -> None:
    ns = dsd.namespace
    dsd.core.create_namespaced_config_map(
        ns, {"metadata": {"name": "r1-rank-table"}, "data": {"hccl.json": RANK_TABLE.read_text()}}
    )
    body = deployment(
        "mi",
        runtime={"engine": "mindie", "image": "mindie:test", "rankTableConfigMap": "r1-rank-table"},
        model={
            "name": "DeepSeek-R1",
            "source": {"pvc": {"claimName": "models", "path": "DeepSeek-R1"}},
            "mtp": True,
        },
        parallelism=TWO_BY_EIGHT,
        expertParallel={"level": 2, "alltoallBufferScaleFactors": [[8192, 5.2], [0, 8.0]]},
        worker={"image": "dsworker:test", "accelerator": {"type": "npu"}},
    )
    dsd.create(body)
    status = dsd.wait_phase("mi", "Ready", timeout=90)
    assert status["runtime"] == "mindie" and status["readyWorkers"] == "2/2"
    fp = status["fingerprint"]

    config = json.loads(dsd.core.read_namespaced_config_map("mi-engine", ns).data["config.json"])
    assert mindie_config_errors(config, multi_node=True) == []
    model = config["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0]
    assert model["modelWeightPath"] == "/model" and model["modelName"] == "DeepSeek-R1"
    assert (model["dp"], model["tp"], model["moe_tp"], model["moe_ep"]) == (2, 8, 1, 16)
    assert model["models"]["deepseekv2"]["alltoall_ep_buffer_scale_factors"] == [
        [8192, 5.2],
        [0, 8.0],
    ]
    assert config["BackendConfig"]["multiNodesInferEnabled"] is True

    pod = sts_of(dsd, "mi").spec.template.spec
    engine = pod.containers[0]
    assert engine.image == "mindie:test" and engine.command[:2] == ["/bin/bash", "-c"]
    assert "mindieservice_daemon" in engine.command[2]
    env = env_of(engine)
    assert env["MIES_CONTAINER_IP"].value_from.field_ref.field_path == "status.podIP"
    assert env["MIES_CONFIG_JSON_PATH"].value.endswith("/config.json")
    assert env["RANK_TABLE_FILE"].value == "/etc/mindie/ranktable/hccl.json"
    assert env["DEEPSEEK_MTP"].value == "1"
    assert engine.resources.limits[NPU] == "8"
    assert "/v2/health/ready" in engine.readiness_probe._exec.command
    assert {p.name: p.container_port for p in engine.ports}["metrics"] == 1027
    volumes = {v.name: v for v in pod.volumes}
    assert volumes["rank-table"].config_map.name == "r1-rank-table"
    stage = pod.init_containers[0]
    assert stage.image == "dsworker:test" and stage.args[:3] == [
        "stage",
        "--store",
        f"/store/{fp[:16]}",
    ]
    assert sorted(p.spec.node_name for p in worker_pods(dsd, "mi")) == ["kwok-npu-0", "kwok-npu-1"]
    table = kube_cluster.kubectl("get", "dsd", "mi", "-n", ns, "--no-headers").stdout.split()
    assert table[:5] == ["mi", "Ready", "2/2", "DeepSeek-R1", "mindie"], table


def test_vllm_on_two_gpu_nodes_reaches_ready(running_operator: OperatorProcess, dsd: Dsd) -> None:
    body = deployment(
        "vl",
        runtime={"engine": "vllm", "extraArgs": ["--gpu-memory-utilization", "0.92"]},
        model={"name": "deepseek-v3", "mtp": True, "quantization": "fp8"},
        parallelism=TWO_BY_EIGHT,
        expertParallel={"level": 2},
        sharding={"enabled": False, "store": None},
        serving={"port": 8000},
        worker={"image": "dsworker:test", "accelerator": {"type": "gpu"}},
    )
    dsd.create(body)
    status = dsd.wait_phase("vl", "Ready", timeout=90)
    assert status["runtime"] == "vllm" and dsd.jobs() == []
    assert dsd.condition("vl", "Sharded")["reason"] == "ShardingDisabled"
    assert status["endpoint"].endswith(":8000/v1")

    pod = sts_of(dsd, "vl").spec.template.spec
    engine = pod.containers[0]
    assert engine.image == "vllm/vllm-openai:v0.13.0"
    assert engine.command[:2] == ["/bin/sh", "-c"] and engine.command[3] == "vllm"
    args = engine.args
    assert args[0] == "/model"
    for flag, value in {
        "--tensor-parallel-size": "8",
        "--data-parallel-size": "2",
        "--data-parallel-size-local": "1",
        "--data-parallel-rpc-port": "29500",
        "--all2all-backend": "deepep_high_throughput",
        "--max-num-seqs": "200",
        "--quantization": "fp8",
    }.items():
        assert args[args.index(flag) + 1] == value, flag
    assert "--enable-expert-parallel" in args and args[-2:] == ["--gpu-memory-utilization", "0.92"]
    launch = json.loads(
        dsd.core.read_namespaced_config_map("vl-engine", dsd.namespace).data["vllm-args.json"]
    )
    assert launch["args"] == args
    head = [a.replace("{pod_ip}", "10.0.0.1") for a in launch["head"]]
    other = [a.replace("{start_rank}", "1") for a in launch["others"]]
    assert vllm_args_errors(args + head, "gpu") == []
    assert vllm_args_errors(args + other, "gpu") == []
    assert "--headless" in other
    assert engine.resources.limits[GPU] == "8"
    assert "/health" in engine.readiness_probe._exec.command
    stage = pod.init_containers[0]
    assert stage.image == "dsworker:test"
    assert stage.args == ["stage-checkpoint", "--source", "/source/DeepSeek-V3", "--dest", "/model"]
    volumes = {v.name: v for v in pod.volumes}
    assert volumes["model"].empty_dir.medium == "Memory"
    assert volumes["source"].persistent_volume_claim.read_only is True
    assert sorted(p.spec.node_name for p in worker_pods(dsd, "vl")) == ["kwok-gpu-0", "kwok-gpu-1"]


@pytest.mark.parametrize(
    "name,spec,message",
    [
        (
            "vllm-buffer",
            {
                "runtime": {"engine": "vllm"},
                "sharding": {"enabled": False, "store": None},
                "expertParallel": {"level": 2, "alltoallBufferScaleFactors": [[0, 8.0]]},
                "worker": {"accelerator": {"type": "gpu"}},
            },
            "spec.expertParallel.alltoallBufferScaleFactors: runtime vllm has no AllToAll buffer table",
        ),
        (
            "vllm-shards",
            {"runtime": {"engine": "vllm"}, "worker": {"accelerator": {"type": "gpu"}}},
            "spec.sharding.enabled: runtime vllm loads the HuggingFace checkpoint itself",
        ),
        (
            "mindie-gpu",
            {
                "runtime": {"engine": "mindie", "image": "mindie:test"},
                "worker": {"accelerator": {"type": "gpu"}},
            },
            "spec.worker.accelerator.type: runtime mindie runs on Ascend npu only",
        ),
    ],
)
def test_a_field_the_runtime_cannot_honour_is_refused_by_the_api_server(
    dsd_crd: str, dsd: Dsd, name: str, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as refused:
        dsd.create(deployment(name, **spec))
    assert refused.value.status == 422
    assert message in refused.value.body, refused.value.body
    assert dsd.get(name) is None
