"""Node-local sharding Jobs on several nodes (issue 19) get the single Job's guarantees (issue
16): completion recorded per node, an unfinished Job with a changed pod replaced, earlier plans'
directories removed per node (pinned, keyed per Job, never beside a live writer), and a cleanup
stranded on a node that left the spec given up with a Warning."""

from __future__ import annotations

import copy
import json
from typing import Any

from fake_cluster import SUMMARY, TWO_NODES, FakeCluster, cond, container, kinds
from test_plan_shard_jobs import (
    cleanups,
    cluster_step_keeping_terminating,
    reasons,
    sharders,
    unschedulable_pod,
)

from deepseek_operator.planning import names

NODES = ["npu-a", "npu-b"]
NODE_LOCAL = copy.deepcopy(TWO_NODES)
NODE_LOCAL["spec"]["sharding"] = {"store": {"hostPath": {"path": "/dev/shm/dsd", "nodes": NODES}}}
OTHER_PLAN = {"parallelism": {"dp": 1, "tp": 16}}
FIRST_PLAN = {"parallelism": {"dp": 2, "tp": 8}}


def node_job(cluster: FakeCluster, i: int) -> dict[str, Any]:
    return cluster.objects[("Job", names.shard_job("r1", cluster.fp(), i))]


def node_of(job: dict[str, Any]) -> str:
    return job["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/hostname"]


def shard_and_serve(cluster: FakeCluster) -> None:
    """The current plan's node Jobs complete and the group rolls to it and turns Ready."""
    for i in range(2):
        if ("Job", names.shard_job("r1", cluster.fp(), i)) in cluster.objects:
            cluster.finish_job(node_job(cluster, i), message=json.dumps(SUMMARY))
    cluster.step()
    sts = cluster.sts()
    if sts.get("status", {}).get("updateRevision"):  # a group of an earlier plan: it rolls
        sts["status"] = {"observedGeneration": sts["metadata"]["generation"], "updateRevision": "x"}
        cluster.step()
    cluster.run_workers()
    result = cluster.step()
    assert result.phase == "Ready", result.status.message


def ready(body: dict[str, Any] = NODE_LOCAL) -> FakeCluster:
    cluster = FakeCluster(body)
    cluster.step()
    shard_and_serve(cluster)
    return cluster


def forget(cluster: FakeCluster, job: dict[str, Any]) -> None:
    """Delete a Job and its pods, as kubectl or a TTL controller does."""
    name = job["metadata"]["name"]
    del cluster.objects[("Job", name)]
    for pod in [
        n
        for n, p in cluster.pods.items()
        if p["metadata"]["labels"].get(names.JOB_NAME_LABEL) == name
    ]:
        del cluster.pods[pod]


# --------------------------------------------------------------------- completion per node


def test_a_deleted_completed_node_job_leaves_a_serving_deployment_alone() -> None:
    cluster = ready()
    nodes = cluster.body["status"]["shards"]["nodes"]
    assert [(n["node"], n["complete"]) for n in nodes] == [("npu-a", True), ("npu-b", True)]
    assert nodes[0]["jobUid"] == node_job(cluster, 0)["metadata"]["uid"]
    assert nodes[0]["bytes"] == SUMMARY["bytes"]
    before = copy.deepcopy(cluster.sts()["spec"])
    forget(cluster, node_job(cluster, 0))
    for _ in range(3):
        result = cluster.step()
        assert result.phase == "Ready", result.status.message
        assert not [o for o in result.apply if o["kind"] == "Job"], kinds(result)
        assert not result.delete
    assert cond(result, "Sharded")["status"] == "True"
    assert cluster.sts()["spec"] == before
    assert result.status.shards is not None and result.status.shards.bytes == 2 * SUMMARY["bytes"]


def test_a_node_job_deleted_while_another_node_shards_is_not_run_again() -> None:
    cluster = FakeCluster(NODE_LOCAL)
    cluster.step()
    cluster.finish_job(node_job(cluster, 0), message=json.dumps(SUMMARY))
    cluster.step()
    forget(cluster, node_job(cluster, 0))
    result = cluster.step()
    assert not [o for o in result.apply if o["kind"] == "Job"], kinds(result)
    assert "1/2 nodes sharded" in result.status.message
    cluster.finish_job(node_job(cluster, 1), message=json.dumps(SUMMARY))
    result = cluster.step()
    assert cond(result, "Sharded")["status"] == "True"
    # Both nodes' numbers: node 0's as recorded, node 1's from its Job.
    assert result.status.shards is not None and result.status.shards.bytes == 2 * SUMMARY["bytes"]


def test_a_node_job_of_another_node_list_is_not_taken_as_recorded() -> None:
    cluster = ready()
    status = cluster.body["status"]
    status["shards"]["nodes"][1]["node"] = "npu-z"  # recorded for another node at that index
    forget(cluster, node_job(cluster, 1))
    result = cluster.step()
    assert ("Job", names.shard_job("r1", cluster.fp(), 1)) in kinds(result)


# --------------------------------------------------------------------- replacement


def test_a_spec_change_replaces_an_unfinished_node_job_and_keeps_a_completed_one() -> None:
    cluster = FakeCluster(NODE_LOCAL)
    cluster.step()
    cluster.finish_job(node_job(cluster, 0), message=json.dumps(SUMMARY))
    done, stuck = node_job(cluster, 0), node_job(cluster, 1)
    unschedulable_pod(cluster, stuck)
    cluster.step()
    cluster.change_spec({"sharding": {"resources": {"requests": {"cpu": "4"}}}})
    result = cluster.step()
    [gone] = result.delete
    assert (gone.kind, gone.name) == ("Job", stuck["metadata"]["name"])
    assert gone.uid == stuck["metadata"]["uid"] and gone.propagation == "Foreground"
    assert "ReplacingShardingJob" in [e.reason for e in result.events]
    cluster.step()
    new = node_job(cluster, 1)
    assert container(new, "shard")["resources"] == {"requests": {"cpu": "4"}}
    assert node_of(new) == "npu-b"
    assert node_job(cluster, 0) is done


# --------------------------------------------------------------------- cleanup per node


def test_old_node_local_directories_are_removed_per_node_on_that_node() -> None:
    cluster = ready()
    fp_a = cluster.fp()
    olds = [node_job(cluster, i) for i in range(2)]
    cluster.change_spec(OTHER_PLAN)
    cluster.step()
    shard_and_serve(cluster)
    made = cleanups(cluster)
    assert sorted(made) == [names.cleanup_job("r1", fp_a, str(i)) for i in range(2)]
    for i, old in enumerate(olds):
        clean = made[names.cleanup_job("r1", fp_a, str(i))]
        assert node_of(clean) == NODES[i]
        assert (
            clean["metadata"]["annotations"][names.CLEANS_UID_ANNOTATION]
            == (old["metadata"]["uid"])
        )
        assert container(clean, "cleanup")["args"] == ["-rf", "--", f"/store/{fp_a[:16]}"]
    cluster.finish_job(made[names.cleanup_job("r1", fp_a, "0")])
    cluster.step()
    assert reasons(cluster).count("OldShardsRemoved") == 1
    assert names.shard_job("r1", fp_a, 0) not in sharders(cluster)
    assert names.shard_job("r1", fp_a, 1) in sharders(cluster)


def test_switching_back_to_a_node_local_plan_waits_for_its_cleanup_on_that_node() -> None:
    cluster = ready()
    fp_a = cluster.fp()
    cluster.change_spec(OTHER_PLAN)
    cluster.step()
    shard_and_serve(cluster)
    clean_a0 = names.cleanup_job("r1", fp_a, "0")
    cluster.finish_job(cleanups(cluster)[names.cleanup_job("r1", fp_a, "1")])
    cluster.step()  # node 1's directory of A removed, its Job deleted; node 0's rm -rf runs
    cluster.change_spec(FIRST_PLAN)
    for _ in range(2):
        result = cluster.step()
        assert "waiting for cleanup Job" in cond(result, "Sharded")["message"]
        assert "npu-a" in cond(result, "Sharded")["message"]
        assert not [o for o in result.apply if o["kind"] == "StatefulSet"]
    cluster.finish_job(cleanups(cluster)[clean_a0])
    result = cluster.step()
    assert {(d.kind, d.name) for d in result.delete} >= {
        ("Job", clean_a0),
        ("Job", names.shard_job("r1", fp_a, 0)),
    }
    assert "RetryingSharding" in [e.reason for e in result.events]
    result = cluster.step()
    assert ("Job", names.shard_job("r1", fp_a, 0)) in kinds(result)
    assert result.phase == "Sharding"


def test_reverting_while_node_jobs_write_cleans_each_node_once_its_writer_is_gone() -> None:
    cluster = ready()
    cluster.change_spec(OTHER_PLAN)
    cluster.step()
    fp_b = cluster.fp()
    cluster.change_spec(FIRST_PLAN)
    stopped: list[str] = []
    cluster_step_keeping_terminating(cluster, stopped)
    assert sorted(stopped) == [names.shard_job("r1", fp_b, i) for i in range(2)]
    made = cleanups(cluster)
    assert all(made[names.cleanup_job("r1", fp_b, str(i))]["spec"]["suspend"] for i in range(2))
    del cluster.objects[("Job", names.shard_job("r1", fp_b, 0))]  # node 0's writer gone
    cluster_step_keeping_terminating(cluster, stopped)
    made = cleanups(cluster)
    assert made[names.cleanup_job("r1", fp_b, "0")]["spec"]["suspend"] is False
    assert made[names.cleanup_job("r1", fp_b, "1")]["spec"]["suspend"] is True  # still writing


# --------------------------------------------------------------------- a lost node


def test_a_cleanup_stranded_on_a_node_that_left_the_spec_is_given_up_with_a_warning() -> None:
    cluster = ready()
    fp_a = cluster.fp()
    cluster.change_spec({"sharding": {"store": {"hostPath": {"nodes": ["npu-a", "npu-c"]}}}})
    cluster.step()
    shard_and_serve(cluster)
    lost = cleanups(cluster)[names.cleanup_job("r1", fp_a, "1")]
    assert node_of(lost) == "npu-b"
    unschedulable_pod(cluster, lost)
    result = cluster.step()
    gone = {(d.kind, d.name) for d in result.delete}
    assert ("Job", lost["metadata"]["name"]) in gone
    assert ("Job", names.shard_job("r1", fp_a, 1)) in gone
    [warning] = [e for e in result.events if e.reason == "OldShardsLeft"]
    assert warning.type == "Warning" and "npu-b" in warning.message and fp_a[:16] in warning.message
    # Node a's cleanup runs on.
    assert names.cleanup_job("r1", fp_a, "0") in cleanups(cluster)
    assert not [e for e in cluster.step().events if e.reason == "OldShardsLeft"]


def test_an_unschedulable_cleanup_on_a_node_still_in_the_spec_is_kept() -> None:
    cluster = ready()
    fp_a = cluster.fp()
    cluster.change_spec(OTHER_PLAN)
    cluster.step()
    shard_and_serve(cluster)
    clean = cleanups(cluster)[names.cleanup_job("r1", fp_a, "1")]
    unschedulable_pod(cluster, clean)
    result = cluster.step()
    assert ("Job", clean["metadata"]["name"]) not in {(d.kind, d.name) for d in result.delete}
    assert "OldShardsLeft" not in reasons(cluster)
