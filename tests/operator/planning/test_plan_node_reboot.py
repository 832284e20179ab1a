"""A node of a node-local store that reboots loses its tmpfs shards: each node's completion
records its bootID, and a node seen with another one is sharded again (that node only, a new
Job, its worker pod held until it completes), with a Warning Event and Sharded False
NodeRebooted. An unknown bootID changes nothing; a re-shard in progress is not restarted."""

from __future__ import annotations

import json
from typing import Any

from fake_cluster import SUMMARY, FakeCluster, cond, kinds
from test_node_shard_jobs import NODE_LOCAL, forget, node_job

from deepseek_operator.planning import Plan, names
from deepseek_operator.planning.objects import NODE_PIN_GATE

BOOTS = {"npu-a": "boot-a1", "npu-b": "boot-b1"}
REBOOTED_B = {"npu-a": "boot-a1", "npu-b": "boot-b2"}


def ready(boot_ids: dict[str, str]) -> FakeCluster:
    """Both node Jobs complete (their Nodes read with `boot_ids`) and the group serves."""
    cluster = FakeCluster(NODE_LOCAL)
    cluster.step(boot_ids=boot_ids)
    for i in range(2):
        cluster.finish_job(node_job(cluster, i), message=json.dumps(SUMMARY))
    cluster.step(boot_ids=boot_ids)
    cluster.run_workers()
    result = cluster.step(boot_ids=boot_ids)
    assert result.phase == "Ready", result.status.message
    return cluster


def entries(cluster: FakeCluster) -> list[dict[str, Any]]:
    return cluster.body["status"]["shards"]["nodes"]


def rebooted_events(result: Plan) -> list[str]:
    return [e.message for e in result.events if e.reason == "NodeRebooted"]


def job_applies(result: Plan) -> list[str]:
    return [name for kind, name in kinds(result) if kind == "Job"]


def test_the_bootid_is_recorded_with_each_nodes_completion_and_the_same_one_changes_nothing() -> (
    None
):
    cluster = ready(BOOTS)
    assert [(e["node"], e.get("bootID")) for e in entries(cluster)] == [
        ("npu-a", "boot-a1"),
        ("npu-b", "boot-b1"),
    ]
    for _ in range(2):
        result = cluster.step(boot_ids=BOOTS)
        assert result.phase == "Ready" and not result.delete and not job_applies(result)
        assert not rebooted_events(result)


def test_a_rebooted_node_alone_is_sharded_again_and_its_worker_waits() -> None:
    cluster = ready(BOOTS)
    old_b = node_job(cluster, 1)["metadata"]["uid"]
    result = cluster.step(boot_ids=REBOOTED_B)
    # Node b's completed Job goes (it would count as complete); node a is untouched.
    jobs = [(d.name, d.uid) for d in result.delete if d.kind == "Job"]
    assert jobs == [(names.shard_job("r1", cluster.fp(), 1), old_b)]
    assert [d.name for d in result.delete if d.kind == "Pod"] == ["r1-worker-1"]
    [event] = [e for e in result.events if e.reason == "NodeRebooted"]
    assert event.type == "Warning"
    assert "node npu-b rebooted (bootID boot-b1 -> boot-b2)" in event.message
    sharded = cond(result, "Sharded")
    assert (sharded["status"], sharded["reason"]) == ("False", "NodeRebooted")
    assert "npu-b" in sharded["message"] and result.phase == "Sharding"
    assert cond(result, "Ready")["status"] == "False"
    workers = cond(result, "WorkersReady")
    assert workers["reason"] == "WaitingForShards" and "npu-b" in workers["message"]
    a, b = entries(cluster)
    assert a["complete"] and a["bootID"] == "boot-a1"
    assert not b.get("complete") and b["lostJobUid"] == old_b and "bootID" not in b

    # The Job is gone: a new one, for node b only.
    result = cluster.step(boot_ids=REBOOTED_B)
    assert job_applies(result) == [names.shard_job("r1", cluster.fp(), 1)]
    new_b = node_job(cluster, 1)["metadata"]["uid"]
    assert new_b != old_b and not rebooted_events(result)
    assert cond(result, "Sharded")["reason"] == "NodeRebooted"
    # The StatefulSet recreates the pod, gated: it is not pinned while node b shards.
    cluster.run_workers()
    for pod in cluster.worker_pods():
        pod["spec"] = {"schedulingGates": [{"name": NODE_PIN_GATE}]}
    result = cluster.step(boot_ids=REBOOTED_B)
    assert [p.name for p in result.pins] == ["r1-worker-0"]
    assert not result.delete and cond(result, "Sharded")["reason"] == "NodeRebooted"

    cluster.finish_job(node_job(cluster, 1), message=json.dumps(SUMMARY))
    result = cluster.step(boot_ids=REBOOTED_B)
    assert cond(result, "Sharded")["status"] == "True"
    assert [p.name for p in result.pins] == ["r1-worker-0", "r1-worker-1"]
    a, b = entries(cluster)
    assert (b["complete"], b["bootID"], b["jobUid"]) == (True, "boot-b2", new_b)
    assert "lostJobUid" not in b and a["bootID"] == "boot-a1"
    for pod in cluster.worker_pods():
        pod["spec"] = {}
    assert cluster.step(boot_ids=REBOOTED_B).phase == "Ready"


def test_an_unknown_bootid_changes_nothing() -> None:
    # The Node cannot be read now: taken as recorded.
    cluster = ready(BOOTS)
    for boots in ({}, {"npu-b": ""}):
        result = cluster.step(boot_ids=boots)
        assert result.phase == "Ready" and not result.delete and not rebooted_events(result)
    # Not readable when the Job completed: no bootID recorded, nothing to compare later.
    cluster = ready({})
    assert all("bootID" not in e for e in entries(cluster))
    result = cluster.step(boot_ids=REBOOTED_B)
    assert result.phase == "Ready" and not result.delete and not rebooted_events(result)


def test_a_reshard_in_progress_is_not_restarted_by_another_reboot() -> None:
    cluster = ready(BOOTS)
    cluster.step(boot_ids=REBOOTED_B)
    cluster.step(boot_ids=REBOOTED_B)  # the new Job
    new_b = node_job(cluster, 1)["metadata"]["uid"]
    for boots in (REBOOTED_B, {"npu-a": "boot-a1", "npu-b": "boot-b3"}):
        result = cluster.step(boot_ids=boots)
        assert not [d for d in result.delete if d.kind == "Job"], result.delete
        assert not rebooted_events(result) and not job_applies(result)
        assert node_job(cluster, 1)["metadata"]["uid"] == new_b
        assert entries(cluster)[1]["lostJobUid"]


def test_a_rebooted_node_whose_job_is_gone_gets_a_new_job_at_once() -> None:
    cluster = ready(BOOTS)
    forget(cluster, node_job(cluster, 0))  # deleted by hand, completion recorded
    result = cluster.step(boot_ids={"npu-a": "boot-a2", "npu-b": "boot-b1"})
    assert rebooted_events(result) and job_applies(result) == [
        names.shard_job("r1", cluster.fp(), 0)
    ]
    assert entries(cluster)[0]["lostJobUid"] == ""
    cluster.finish_job(node_job(cluster, 0), message=json.dumps(SUMMARY))
    result = cluster.step(boot_ids={"npu-a": "boot-a2", "npu-b": "boot-b1"})
    assert cond(result, "Sharded")["status"] == "True"
    assert entries(cluster)[0]["bootID"] == "boot-a2"
