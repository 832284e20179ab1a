"""Ascend-ready worker pods on the real API server with kwok nodes: the HCCL rank table fills in
once the device plugin's annotations are there (and the group waits until then); the mounts,
groups and environment of a rendered worker pod; the Volcano PodGroup; node-local shards on two
nodes; the staging request against the real stager on a synthetic checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ascend_plugin import annotate
from jsonschema import Draft202012Validator
from test_operator import (
    UNSCHEDULABLE,
    _with_ips,
    deployment,
    finish_pending_pod,
    job_pod,
    shard_job,
    sts_of,
    worker_pods,
)

from conftest import Dsd, OperatorProcess
from deepseek_operator.planning import names

pytestmark = pytest.mark.integration

FORMATS = Path(__file__).resolve().parents[1] / "data" / "formats"
NPU_NODES = ["kwok-npu-0", "kwok-npu-1"]


def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((FORMATS / name).read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _npu(name: str, **spec: Any) -> dict[str, Any]:
    body = deployment(
        name,
        parallelism={"nodes": 2, "devicesPerNode": 2, "tp": 2, "moeTp": 2},
        worker={"image": "dsworker:test", "accelerator": {"type": "npu"}, **spec.pop("worker", {})},
        **spec,
    )
    return body


def _config_map(dsd: Dsd, name: str) -> Any:
    return dsd.core.read_namespaced_config_map(name, dsd.namespace)


def test_rank_table_fills_in_once_the_device_plugin_annotates_and_the_group_waits(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(
        _npu(
            "r1",
            expertParallel={"level": 2, "interconnect": "switch"},
            worker={"ascend": {"deviceGroupId": 1001}},
        )
    )
    dsd.wait(
        "WorkersReady RankTableIncomplete",
        lambda: dsd.condition("r1", "WorkersReady").get("reason") == "RankTableIncomplete",
        timeout=90,
    )
    pods = dsd.wait("two worker pods with IPs", lambda: _with_ips(worker_pods(dsd, "r1"), 2))
    # kwok reports the pods Ready: still the group waits, and says for what.
    dsd.wait("the pods Ready", lambda: all(_ready(p) for p in worker_pods(dsd, "r1")))
    missing = "r1-worker-1: no ascend.kubectl.kubernetes.io/ascend-910-configuration annotation"
    status = dsd.wait(
        "the status to name the missing annotation",
        lambda: s if missing in (s := dsd.status("r1")).get("message", "") else None,
    )
    assert status["phase"] == "Staging" and status["readyWorkers"] == "2/2"
    cm = _config_map(dsd, "r1-hccl")
    assert "hccl.json" not in (cm.data or {}) and cm.data["status"].startswith("initializing")
    assert cm.metadata.owner_references[0].name == "r1"

    annotate(dsd.core, dsd.namespace, pods, 2)
    dsd.wait_phase("r1", "Ready", timeout=60)
    table = json.loads(_config_map(dsd, "r1-hccl").data["hccl.json"])
    assert list(_validator("hccl_rank_table.schema.json").iter_errors(table)) == []
    by_ip = {p.status.pod_ip: p.metadata.name for p in worker_pods(dsd, "r1")}
    servers = table["server_list"]
    assert [by_ip[s["container_ip"]] for s in servers] == ["r1-worker-0", "r1-worker-1"]
    assert [d["rank_id"] for s in servers for d in s["device"]] == ["0", "1", "2", "3"]

    # The rendered worker pod, as the API server holds it.
    pod = dsd.core.read_namespaced_pod("r1-worker-0", dsd.namespace)
    engine = next(c for c in pod.spec.containers if c.name == "engine")
    mounts = {m.mount_path: m for m in engine.volume_mounts}
    for path in ("/usr/local/Ascend/driver", "/usr/local/dcmi", "/usr/local/bin/npu-smi"):
        assert mounts[path].read_only is True
    for path in ("/etc/ascend_install.info", "/etc/hccn.conf", "/etc/dsop/hccl"):
        assert mounts[path].read_only is True
    host_paths = {v.host_path.path: v.host_path.type for v in pod.spec.volumes if v.host_path}
    assert host_paths["/usr/local/Ascend/driver"] == "Directory"
    assert host_paths["/etc/hccn.conf"] == "File"
    assert pod.spec.security_context.supplemental_groups == [1001]
    assert pod.spec.security_context.run_as_non_root is True and not pod.spec.host_network
    env = {e.name: e for e in engine.env}
    assert env["HCCL_IF_IP"].value_from.field_ref.field_path == "status.podIP"
    assert env["HCCL_CONNECT_TIMEOUT"].value == "1200"
    assert env["RANK_TABLE_FILE"].value == "/etc/dsop/hccl/hccl.json"
    assert int(env["HCCL_BUFFSIZE"].value) >= 200  # AllToAll EP (level 2)
    assert [c.name for c in pod.spec.init_containers] == ["stage", "rank-table"]


def _count(pods: list[Any], n: int) -> list[Any] | None:
    return pods if len(pods) == n else None


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())


def test_host_network_is_optional(running_operator: OperatorProcess, dsd: Dsd) -> None:
    dsd.create(_npu("hn", worker={"ascend": {"hostNetwork": True, "driverMounts": False}}))
    spec = sts_of(dsd, "hn").spec.template.spec
    assert spec.host_network is True and spec.dns_policy == "ClusterFirstWithHostNet"
    engine = spec.containers[0]
    assert "/usr/local/Ascend/driver" not in {m.mount_path for m in engine.volume_mounts}


def test_volcano_pod_group_with_min_member(
    running_operator: OperatorProcess, dsd: Dsd, kube_cluster: Any
) -> None:
    from localcluster import volcano_podgroup_crd

    crd = volcano_podgroup_crd(kube_cluster.bin_dir)
    kube_cluster.kubectl("apply", "--server-side", "-f", str(crd))
    kube_cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/podgroups.scheduling.volcano.sh",
    )
    dsd.create(_npu("gang", worker={"schedulerName": "volcano"}))
    custom = dsd.objects
    group = dsd.wait(
        "PodGroup gang-workers",
        lambda: _get_group(custom, dsd.namespace, "gang-workers"),
        timeout=90,
    )
    assert group["spec"]["minMember"] == 2
    owner = group["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "DeepSeekDeployment" and owner["name"] == "gang"
    assert owner["controller"] is True
    pods = dsd.wait("the worker pods", lambda: _count(worker_pods(dsd, "gang"), 2))
    for pod in pods:  # no Volcano scheduler runs here: they wait, in the group
        assert pod.metadata.annotations[names.VOLCANO_GROUP_ANNOTATION] == "gang-workers"
        assert pod.spec.scheduler_name == "volcano"


def _get_group(custom: Any, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return custom.get_namespaced_custom_object(
            "scheduling.volcano.sh", "v1beta1", namespace, "podgroups", name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_node_local_shards_on_two_nodes(running_operator: OperatorProcess, dsd: Dsd) -> None:
    nodes = ["kwok-npu-1", "kwok-npu-0"]  # reversed: pod 0 must land on kwok-npu-1
    dsd.create(
        deployment(
            "local",
            parallelism={"nodes": 2, "devicesPerNode": 2, "tp": 2, "moeTp": 2},
            sharding={"store": {"pvc": None, "hostPath": {"path": "/dev/shm/dsd", "nodes": nodes}}},
        )
    )
    status = dsd.wait_phase("local", "Ready", timeout=120)
    fp = status["fingerprint"]
    jobs = sorted(dsd.jobs("sharder"), key=lambda j: j.metadata.name)
    assert [j.metadata.name for j in jobs] == [
        f"local-shard-{fp[:10]}-n0",
        f"local-shard-{fp[:10]}-n1",
    ]
    for i, job in enumerate(jobs):
        spec = job.spec.template.spec
        assert spec.node_selector == {"kubernetes.io/hostname": nodes[i]}
        args = spec.containers[0].args
        assert args[args.index("--node-index") + 1] == str(i)
        [pod] = dsd.pods(f"batch.kubernetes.io/job-name={job.metadata.name}")
        assert pod.spec.node_name == nodes[i]
    for pod in worker_pods(dsd, "local"):
        ordinal = int(pod.metadata.name.rsplit("-", 1)[1])
        assert pod.spec.node_name == nodes[ordinal], pod.metadata.name
        assert not pod.spec.scheduling_gates
    template = sts_of(dsd, "local").spec.template.spec
    assert [g.name for g in template.scheduling_gates] == ["llm.dsop.io/node-pin"]
    engine = template.containers[0]
    assert engine.args[engine.args.index("--model") + 1] == f"/store/{fp[:16]}"


def test_staging_request_equals_the_stagers_real_bytes(
    running_operator: OperatorProcess, dsd: Dsd, tmp_path: Path
) -> None:
    """The sharder's real summary of a synthetic checkpoint, handed to the operator as its Job
    pod's termination message; the request it derives, against what the real stager copies."""
    from dsworker.contract.layout import ParallelPlan, pod_ranks
    from dsworker.tools.shard import shard
    from dsworker.tools.stage import stage_ranks
    from dsworker.tools.synth import synthesize

    ckpt = synthesize(tmp_path / "ckpt", "v3", "tiny", "bf16", True, 0, None)
    store = tmp_path / "store"
    summary = shard(ckpt, store, ParallelPlan(4, 2, 2, 2, 2), mtp=True)
    real = []
    for pod in (0, 1):
        dest = tmp_path / f"dest-{pod}"
        stage_ranks(store, dest, pod_ranks(pod, 2))
        real.append(sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()))
    smallest_file = min(p.stat().st_size for p in store.rglob("*.safetensors"))

    dsd.create(
        deployment(
            "staged",
            model={"source": {"pvc": {"claimName": "models", "path": "DeepSeek-V3"}}, "mtp": True},
            parallelism={"nodes": 2, "devicesPerNode": 2, "tp": 2, "moeTp": 2},
            sharding={"resources": UNSCHEDULABLE},
            worker={
                "image": "dsworker:test",
                "accelerator": {"type": "cpu"},
                "resources": {"requests": {"memory": "1Gi"}},
            },
        )
    )
    job = shard_job(dsd, "staged")
    finish_pending_pod(dsd, job_pod(dsd, job.metadata.name), 0, json.dumps(summary))
    sts = sts_of(dsd, "staged")
    engine = sts.spec.template.spec.containers[0]
    request = engine.resources.requests["memory"]
    assert request.endswith("Mi")
    staged = int(request[:-2]) * (1 << 20) - (1 << 30)
    # Rounded up to whole MiB, the request holds the largest pod's real bytes, within one file.
    assert 0 <= staged - max(real) < smallest_file + (1 << 20), (staged, real)
    recorded = dsd.wait(
        "status.shards.dirBytes",
        lambda: (dsd.status("staged").get("shards") or {}).get("dirBytes"),
    )
    assert recorded == summary["dirBytes"]
