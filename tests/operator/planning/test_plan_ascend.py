"""Ascend worker pods: the HCCL rank table (validated against the recorded schema), the driver
mounts, device group, host network and HCCL environment, the Volcano PodGroup, node-local shards
on several nodes and the exact staging request."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from fake_cluster import (
    SUMMARY,
    TWO_NODES,
    FakeCluster,
    cond,
    container,
    device_annotation,
    kinds,
)
from jsonschema import Draft202012Validator

from deepseek_operator.api import parse_deployment
from deepseek_operator.planning import names
from deepseek_operator.planning.ascend import rank_table
from deepseek_operator.planning.ascend.pod import hccl_buffer_mb
from deepseek_operator.planning.objects.placement import NODE_PIN_GATE

FORMATS = Path(__file__).resolve().parents[2] / "data" / "formats"


def schema(name: str) -> Draft202012Validator:
    doc = json.loads((FORMATS / name).read_text())
    return Draft202012Validator(doc, format_checker=Draft202012Validator.FORMAT_CHECKER)


def facts(n: int, d: int, **drop: bool) -> list[rank_table.PodFacts]:
    return [
        rank_table.PodFacts(
            ordinal=i,
            name=f"r1-worker-{i}",
            pod_ip=None if drop.get(f"ip{i}") else f"10.1.0.{i + 1}",
            host_ip=f"10.0.0.{i + 1}",
            annotation=None if drop.get(f"ann{i}") else device_annotation(f"r1-worker-{i}", i, d),
        )
        for i in range(n)
    ]


# ------------------------------------------------------------------------- rank table


def test_rank_table_is_valid_and_numbers_ranks_in_pod_then_device_order() -> None:
    table = rank_table.build(reversed(facts(2, 8)), nodes=2, devices_per_node=8)
    assert table.complete and table.missing == []
    assert list(schema("hccl_rank_table.schema.json").iter_errors(table.table)) == []
    servers = table.table["server_list"]
    assert [s["server_id"] for s in servers] == ["10.0.0.1", "10.0.0.2"]
    assert [s["container_ip"] for s in servers] == ["10.1.0.1", "10.1.0.2"]
    ranks = [int(d["rank_id"]) for s in servers for d in s["device"]]
    assert ranks == list(range(16)) and table.table["server_count"] == "2"
    assert servers[1]["device"][0] == {"device_id": "0", "device_ip": "192.168.1.1", "rank_id": "8"}


def test_the_fake_device_plugin_annotation_matches_the_recorded_format() -> None:
    doc = json.loads(device_annotation("p-0", 0, 8))
    assert list(schema("ascend_device_plugin_annotation.schema.json").iter_errors(doc)) == []


@pytest.mark.parametrize(
    ("drop", "n", "missing"),
    [
        ({"ann1": True}, 2, "pod r1-worker-1: no ascend.kubectl.kubernetes.io/ascend-910"),
        ({"ip0": True}, 2, "pod r1-worker-0: no pod IP yet"),
        ({}, 1, "worker pod 1 does not exist yet"),
    ],
)
def test_an_incomplete_rank_table_says_what_is_missing(
    drop: dict[str, bool], n: int, missing: str
) -> None:
    table = rank_table.build(facts(n, 8, **drop), nodes=2, devices_per_node=8)
    assert not table.complete and table.table is None
    assert any(m.startswith(missing) for m in table.missing), table.missing


def test_a_wrong_device_count_or_bad_ip_is_named() -> None:
    pods = facts(2, 4)  # the plugin gave 4 NPUs, the pods run 8 ranks
    assert "lists 4 device(s), the pod runs 8 ranks" in rank_table.build(pods, 2, 8).missing[0]
    bad = json.dumps({"devices": [{"device_id": "0", "device_ip": "not-an-ip"}]})
    pod = rank_table.PodFacts(0, "p-0", "10.1.0.1", "10.0.0.1", bad)
    assert "no valid id or IP" in rank_table.build([pod], 1, 1).missing[0]


def test_one_device_ip_twice_is_refused() -> None:
    pods = facts(2, 2)
    pods[1] = rank_table.PodFacts(
        1, "r1-worker-1", "10.1.0.2", "10.0.0.2", device_annotation("x", 0, 2)
    )
    table = rank_table.build(pods, 2, 2)
    assert not table.complete and "one device IP for two devices" in table.missing[-1]


# ------------------------------------------------------------------------- the planner


def test_the_group_waits_for_the_rank_table_then_serves() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    cluster.finish_job(cluster.job(), message=json.dumps(SUMMARY))
    cluster.step()
    cluster.run_workers(device_plugin=False)  # kwok marks them Ready; no annotation yet
    result = cluster.step()
    assert result.phase == "Staging"
    workers = cond(result, "WorkersReady")
    assert workers["reason"] == "RankTableIncomplete"
    assert (
        "r1-worker-0: no ascend.kubectl.kubernetes.io/ascend-910-configuration"
        in workers["message"]
    )
    cm = cluster.objects[("ConfigMap", "r1-hccl")]
    assert rank_table.TABLE_KEY not in cm["data"] and cm["data"]["status"].startswith(
        "initializing"
    )
    for i, pod in enumerate(cluster.worker_pods()):
        pod["metadata"]["annotations"] = {
            rank_table.DEVICE_ANNOTATION: device_annotation(pod["metadata"]["name"], i, 8)
        }
    result = cluster.step()
    assert result.phase == "Ready"
    table = json.loads(cluster.objects[("ConfigMap", "r1-hccl")]["data"][rank_table.TABLE_KEY])
    assert table["status"] == "completed"
    assert list(schema("hccl_rank_table.schema.json").iter_errors(table)) == []


def test_an_ascend_worker_pod_has_driver_mounts_device_group_and_hccl_env() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["expertParallel"] = {"level": 2, "interconnect": "switch"}
    body["spec"]["worker"]["ascend"] = {"deviceGroupId": 1234, "hostNetwork": True}
    cluster = FakeCluster(body)
    cluster.until_ready()
    pod = cluster.sts()["spec"]["template"]["spec"]
    engine = container(cluster.sts(), "engine")
    mounts = {m["mountPath"]: m for m in engine["volumeMounts"]}
    for path in (
        "/usr/local/Ascend/driver",
        "/usr/local/dcmi",
        "/usr/local/bin/npu-smi",
        "/etc/ascend_install.info",
        "/etc/hccn.conf",
    ):
        assert mounts[path]["readOnly"] is True
    host = {v["hostPath"]["path"]: v["hostPath"]["type"] for v in pod["volumes"] if "hostPath" in v}
    assert host["/etc/hccn.conf"] == "File" and host["/usr/local/Ascend/driver"] == "Directory"
    assert pod["securityContext"]["supplementalGroups"] == [1234]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    env = {e["name"]: e for e in engine["env"]}
    assert env["HCCL_IF_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["HCCL_CONNECT_TIMEOUT"]["value"] == "1200"  # the user's entry (same as default)
    assert env["RANK_TABLE_FILE"]["value"] == rank_table.TABLE_PATH == env["RANKTABLEFILE"]["value"]
    assert int(env["HCCL_BUFFSIZE"]["value"]) >= 200
    assert mounts[rank_table.TABLE_DIR]["readOnly"] is True
    wait = container(cluster.sts(), "rank-table")
    assert wait["args"][0] == rank_table.TABLE_PATH
    assert wait["securityContext"]["readOnlyRootFilesystem"] is True


def test_driver_mounts_switch_off_and_other_accelerators_get_nothing() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["worker"]["ascend"] = {"driverMounts": False}
    cluster = FakeCluster(body)
    cluster.until_ready()
    paths = {m["mountPath"] for m in container(cluster.sts(), "engine")["volumeMounts"]}
    assert "/usr/local/Ascend/driver" not in paths and rank_table.TABLE_DIR in paths
    body["spec"]["worker"]["accelerator"] = {"type": "gpu"}
    gpu = FakeCluster(body)
    gpu.until_ready()
    spec = gpu.sts()["spec"]["template"]["spec"]
    assert "supplementalGroups" not in spec["securityContext"] and "hostNetwork" not in spec
    assert ("ConfigMap", "r1-hccl") not in gpu.objects
    assert "HCCL_IF_IP" not in {e["name"] for e in container(gpu.sts(), "engine")["env"]}


def test_hccl_buffer_size_only_where_all_to_all_ep_implies_one() -> None:
    def spec(**patch: Any) -> Any:
        body = copy.deepcopy(TWO_NODES)
        body["spec"].update(patch)
        return parse_deployment(body).deployment.spec

    assert hccl_buffer_mb(spec()) is None  # level 1 (AllGather): HCCL's default
    level2 = {"expertParallel": {"level": 2, "interconnect": "switch"}}
    tokens = spec(**level2).serving.max_input_token_len
    assert hccl_buffer_mb(spec(**level2)) == max(200, -(-tokens * 7168 * 2 // (1 << 20)))
    given = {**level2, "worker": {**TWO_NODES["spec"]["worker"], "ascend": {"hcclBufferMb": 512}}}
    assert hccl_buffer_mb(spec(**given)) == 512


def test_volcano_gets_a_pod_group_owned_by_the_deployment() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["worker"]["schedulerName"] = "volcano"
    cluster = FakeCluster(body)
    cluster.until_ready()
    group = cluster.objects[("PodGroup", "r1-workers")]
    assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert group["spec"]["minMember"] == 2
    assert group["metadata"]["ownerReferences"][0]["uid"] == "uid-r1"
    template = cluster.sts()["spec"]["template"]
    assert template["metadata"]["annotations"][names.VOLCANO_GROUP_ANNOTATION] == "r1-workers"
    assert template["spec"]["schedulerName"] == "volcano"
    assert ("PodGroup", "r1-workers") not in FakeCluster(TWO_NODES).objects


# ------------------------------------------------------------------ node-local, several nodes

NODE_LOCAL = copy.deepcopy(TWO_NODES)
NODE_LOCAL["spec"]["sharding"] = {
    "store": {"hostPath": {"path": "/dev/shm/dsd", "nodes": ["npu-a", "npu-b"]}}
}


def test_node_local_shards_run_one_job_per_node_and_pin_the_workers() -> None:
    cluster = FakeCluster(NODE_LOCAL)
    result = cluster.step()
    fp = result.status.fingerprint
    jobs = [n for k, n in kinds(result) if k == "Job"]
    assert jobs == [f"r1-shard-{fp[:10]}-n0", f"r1-shard-{fp[:10]}-n1"]
    for i, node in enumerate(("npu-a", "npu-b")):
        job = cluster.objects[("Job", jobs[i])]
        pod = job["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"kubernetes.io/hostname": node}
        args = pod["containers"][0]["args"]
        assert args[args.index("--node-index") + 1] == str(i)
        assert args[args.index("--devices-per-node") + 1] == "8"
    cluster.finish_job(cluster.objects[("Job", jobs[0])], message=json.dumps(SUMMARY))
    result = cluster.step()
    assert result.phase == "Sharding" and "1/2 nodes sharded" in result.status.message
    assert ("StatefulSet", "r1-worker") not in cluster.objects
    cluster.finish_job(cluster.objects[("Job", jobs[1])], message=json.dumps(SUMMARY))
    result = cluster.step()
    assert cond(result, "Sharded")["status"] == "True"
    assert result.status.shards.bytes == 2 * SUMMARY["bytes"]
    template = cluster.sts()["spec"]["template"]["spec"]
    assert template["schedulingGates"] == [{"name": NODE_PIN_GATE}]
    assert "initContainers" not in template or all(
        c["name"] != "stage" for c in template["initContainers"]
    )
    cluster.run_workers()
    for pod in cluster.worker_pods():
        pod["spec"] = {"schedulingGates": [{"name": NODE_PIN_GATE}]}
    result = cluster.step()
    pins = {p.name: p.node_selector for p in result.pins}
    assert pins == {
        "r1-worker-0": {"kubernetes.io/hostname": "npu-a"},
        "r1-worker-1": {"kubernetes.io/hostname": "npu-b"},
    }
    for pod in cluster.worker_pods():
        pod["spec"] = {}
    assert cluster.step().pins == []


def test_a_failed_node_job_fails_the_shards_naming_the_node() -> None:
    cluster = FakeCluster(NODE_LOCAL)
    result = cluster.step()
    job = cluster.objects[("Job", [n for k, n in kinds(result) if k == "Job"][1])]
    cluster.finish_job(job, ok=False, message=json.dumps({"error": "disk full"}), code=1)
    job["status"]["conditions"][0]["type"] = "Failed"
    result = cluster.step()
    assert result.phase == "Failed" and "node npu-b" in result.status.message


# --------------------------------------------------------------------- staging request

R1_DIRS = {"top": 30_000_000, "vocab": 1_000_000_000, "norm": 2_000_000_000}


def test_staging_request_is_the_pods_own_share_by_the_stagers_rule() -> None:
    from dsworker.contract.layout import pod_ranks, staged_bytes

    dirs = {**R1_DIRS, "attn": 3_000_000_000, "dense": 4_000_000_000, "moe": 40_000_000_000}
    summary = {**SUMMARY, "dirBytes": dirs}
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready(summary)
    spec = parse_deployment(cluster.body).deployment.spec
    plan = spec.parallelism.to_plan()
    want = max(staged_bytes(plan, pod_ranks(i, 8), dirs) for i in range(2))
    engine = container(cluster.sts(), "engine")
    request = engine["resources"]["requests"]["memory"]
    assert request == f"{-(-((900 << 30) + want) // (1 << 20))}Mi"
    assert cluster.body["status"]["shards"]["dirBytes"] == dirs
    # The sharder's pod gone: the status keeps the request, and the template, unchanged.
    before = copy.deepcopy(cluster.sts()["spec"])
    for name in [n for n in cluster.pods if "shard" in n]:
        del cluster.pods[name]
    cluster.step()
    assert cluster.sts()["spec"] == before


def test_replacing_a_lost_node_reshards_for_the_new_placement() -> None:
    cluster = FakeCluster(NODE_LOCAL)
    first = cluster.step().status.fingerprint
    cluster.change_spec({"sharding": {"store": {"hostPath": {"nodes": ["npu-a", "npu-c"]}}}})
    result = cluster.step()
    assert result.status.fingerprint != first
    jobs = [cluster.objects[k] for k in cluster.objects if k[0] == "Job"]
    placed = {
        j["metadata"]["name"]: j["spec"]["template"]["spec"]["nodeSelector"][
            "kubernetes.io/hostname"
        ]
        for j in jobs
        if result.status.fingerprint[:10] in j["metadata"]["name"]
    }
    assert sorted(placed.values()) == ["npu-a", "npu-c"]


@pytest.mark.parametrize("own_table", [False, True])
def test_mindie_on_two_nodes_names_each_variable_once_and_uses_one_rank_table(
    own_table: bool,
) -> None:
    """MindIE and the Ascend pod settings both set POD_IP and the rank table variables: the API
    server refuses a container naming one twice. The operator's table serves unless the user
    names their own, and then no init container waits for the operator's."""
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["runtime"] = {"engine": "mindie", "image": "mindie:test"}
    if own_table:
        body["spec"]["runtime"]["rankTableConfigMap"] = "r1-rank-table"
    cluster = FakeCluster(body)
    cluster.until_ready()
    pod = cluster.sts()["spec"]["template"]["spec"]
    names_ = [e["name"] for e in container(cluster.sts(), "engine")["env"]]
    assert len(names_) == len(set(names_)), names_
    env = {e["name"]: e for e in container(cluster.sts(), "engine")["env"]}
    init = [c["name"] for c in pod.get("initContainers") or ()]
    if own_table:
        assert env["RANK_TABLE_FILE"]["value"] == "/etc/mindie/ranktable/hccl.json"
        assert "rank-table" not in init
    else:
        assert env["RANK_TABLE_FILE"]["value"] == rank_table.TABLE_PATH
        assert "rank-table" in init
