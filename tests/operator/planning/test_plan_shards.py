"""Sharding through its lifecycle (planning/shards.py): the Job first, the workers after it
completes, failures, a sharder that cannot start, and resharding while the old group serves."""

from __future__ import annotations

import copy
import json

import pytest
from fake_cluster import (
    SUMMARY,
    TWO_NODES,
    FakeCluster,
    arg,
    cond,
    container,
    job_of,
    kinds,
    template_revision,
    waiting_container,
)

from deepseek_operator.planning import names


def test_first_pass_creates_services_and_the_sharding_job_only() -> None:
    cluster = FakeCluster(TWO_NODES)
    result = cluster.step()
    fp = result.status.fingerprint
    assert fp and len(fp) == 64
    assert kinds(result) == [
        ("Service", "r1-ranks"),
        ("Service", "r1"),
        ("Job", f"r1-shard-{fp[:10]}"),
    ]
    assert result.phase == "Sharding"
    assert cond(result, "Validated")["status"] == "True"
    assert cond(result, "Sharded")["reason"] == "ShardingPending"
    assert cond(result, "WorkersReady")["reason"] == "WaitingForShards"
    status = result.status.to_dict()
    assert status["worldSize"] == 16 and status["readyWorkers"] == "0/2"
    # Printed as EP: moeEp computed from worldSize / moeTp (the EP level is 1).
    assert status["moeEp"] == 4
    assert status["endpoint"] == "http://r1.llm.svc:1025/v1"
    assert status["modelName"] == "DeepSeek-R1"  # printed as the Model column
    assert [e.reason for e in result.events] == ["Sharding"]


def test_statefulset_appears_only_after_the_job_completes() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    assert not any(k == "StatefulSet" for k, _ in cluster.objects)
    for _ in range(3):  # Job still running: nothing new
        result = cluster.step()
        assert result.phase == "Sharding"
        assert not any(k == "StatefulSet" for k, _ in cluster.objects)
    cluster.finish_job(cluster.job(), message=json.dumps(SUMMARY))
    result = cluster.step()
    assert [k for k, _ in kinds(result)] == [
        "Service",
        "Service",
        "ConfigMap",
        "StatefulSet",
        "PodDisruptionBudget",
        "ConfigMap",  # the HCCL rank table, once the StatefulSet is there
    ]
    assert result.phase == "Staging"
    assert cond(result, "Sharded")["reason"] == "ShardsComplete"
    assert result.status.to_dict()["shards"] == {
        **SUMMARY,
        "job": cluster.job()["metadata"]["name"],
    }


def test_sharding_disabled_starts_workers_at_once() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["model"]["mtp"] = False
    body["spec"]["model"]["architecture"] = "DeepseekV2"
    body["spec"]["sharding"] = {"enabled": False}
    cluster = FakeCluster(body)
    result = cluster.step()
    assert "Job" not in {k for k, _ in kinds(result)}
    assert cond(result, "Sharded")["reason"] == "ShardingDisabled"
    sts = cluster.sts()
    engine = container(sts, "engine")
    assert arg(engine["args"], "--model") == "/source/DeepSeek-R1"
    init = sts["spec"]["template"]["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["rank-table"]  # no staging, only the HCCL rank table
    cluster.run_workers()
    result = cluster.step()
    assert result.phase == "Ready" and result.status.shards is None


def test_sharding_failure_past_backoff_then_retry_on_spec_change() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    job = cluster.job()
    cluster.finish_job(job, ok=False, message="OSError: No space left on device", code=1)
    result = cluster.step()
    assert result.phase == "Failed"
    assert "No space left on device" in result.status.message
    assert cond(result, "Sharded")["reason"] == "ShardingFailed"
    assert cond(result, "Validated")["status"] == "True"
    assert not cluster.step().delete  # terminal until the spec changes
    cluster.change_spec({"sharding": {"backoffLimit": 5}})  # same fingerprint
    result = cluster.step()
    assert [(d.kind, d.name) for d in result.delete] == [("Job", job["metadata"]["name"])]
    assert "RetryingSharding" in [e.reason for e in result.events]
    assert result.phase == "Sharding"
    result = cluster.step()
    new = cluster.job()
    assert new["spec"]["backoffLimit"] == 5
    assert new["metadata"]["annotations"][names.GENERATION_ANNOTATION] == "2"


@pytest.mark.parametrize(
    "reason,condition",
    [
        ("ErrImagePull", "ImagePullFailed"),
        ("ImagePullBackOff", "ImagePullFailed"),
        ("InvalidImageName", "ImagePullFailed"),
        ("CreateContainerConfigError", "ContainerConfigError"),
        ("CreateContainerError", "ContainerConfigError"),
    ],
)
def test_a_sharder_that_cannot_start_says_why(reason: str, condition: str) -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    job = cluster.job()
    name = job["metadata"]["name"]
    cluster.pods["shard-pod"] = {
        "metadata": {
            "name": "shard-pod",
            "uid": "shard-pod",
            "labels": {**job["spec"]["template"]["metadata"]["labels"], names.JOB_NAME_LABEL: name},
        },
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                waiting_container("shard", reason, 'pull "reg/dsworker:1": not found')
            ],
        },
    }
    result = cluster.step()
    sharded = cond(result, "Sharded")
    assert (sharded["status"], sharded["reason"]) == ("False", condition)
    assert f"container shard: {reason}" in sharded["message"]
    assert 'pull "reg/dsworker:1": not found' in sharded["message"]
    assert result.phase == "Pending" and reason in result.status.message


def test_reshard_keeps_the_old_group_until_the_new_shards_are_complete() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    old_fp, old_job = cluster.fp(), cluster.job()["metadata"]["name"]
    old_template = copy.deepcopy(cluster.sts()["spec"])
    cluster.change_spec({"parallelism": {"dp": 1, "tp": 16}})
    result = cluster.step()
    new_fp = cluster.fp()
    assert new_fp != old_fp
    new_job = names.shard_job("r1", new_fp)
    assert ("Job", new_job) in kinds(result)
    assert result.phase == "Sharding"
    assert cond(result, "Ready")["status"] == "True"
    assert cond(result, "Ready")["reason"] == "ServingPreviousPlan"
    assert result.status.world_size == 16
    for _ in range(2):
        cluster.step()
        assert cluster.sts()["spec"] == old_template
    cluster.finish_job(cluster.objects[("Job", new_job)], message=json.dumps(SUMMARY))
    result = cluster.step()
    engine = container(cluster.sts(), "engine")
    assert arg(container(cluster.sts(), "stage")["args"], "--store") == f"/store/{new_fp[:16]}"
    assert {e["name"]: e.get("value") for e in engine["env"]}["DSOP_FINGERPRINT"] == new_fp
    # roll the group
    sts = cluster.sts()
    sts["status"] = {
        "observedGeneration": sts["metadata"]["generation"],
        "updateRevision": template_revision(sts["spec"]["template"]),
    }
    result = cluster.step()
    assert len(result.delete) == 2
    cluster.run_workers()
    result = cluster.step()
    assert result.phase == "Ready"
    # Ready on the new plan: old shards go through a cleanup Job on the old Job's store.
    cleanup = next(o for o in result.apply if o["metadata"]["name"].startswith("r1-clean-"))
    assert cleanup["metadata"]["name"] == names.cleanup_job("r1", old_fp)
    rm = container(cleanup, "cleanup")
    assert rm["command"] == ["rm"] and rm["args"] == ["-rf", "--", f"/store/{old_fp[:16]}"]
    volumes = cleanup["spec"]["template"]["spec"]["volumes"]
    assert volumes == [{"name": "store", "persistentVolumeClaim": {"claimName": "shards"}}]
    assert ("Job", old_job) in cluster.objects  # until the cleanup is done
    cluster.finish_job(cluster.objects[("Job", cleanup["metadata"]["name"])])
    result = cluster.step()
    assert [(d.kind, d.name) for d in result.delete] == [("Job", old_job)]
    assert "OldShardsRemoved" in [e.reason for e in result.events]
    final = cluster.step()
    assert not final.delete and final.phase == "Ready"


def test_changes_that_keep_the_shards_keep_the_job() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    job = cluster.job()["metadata"]["name"]
    cluster.change_spec({"serving": {"maxSeqLen": 8192}, "worker": {"image": "reg/dsworker:2"}})
    cluster.step()
    assert [n for k, n in cluster.objects if k == "Job"] == [job]


def test_sharder_pod_gone_keeps_the_staged_size_and_the_serving_group() -> None:
    cluster = FakeCluster(TWO_NODES)
    assert cluster.until_ready().phase == "Ready"
    before = copy.deepcopy(cluster.sts())
    # PodGC (or a node scaled away) removes the completed sharder's pod and its termination message.
    for name in [n for n, p in cluster.pods.items() if job_of(p)]:
        del cluster.pods[name]
    for _ in range(2):
        result = cluster.step()
        assert result.phase == "Ready" and not result.delete
    assert cluster.sts()["spec"] == before["spec"]
    assert cluster.sts()["metadata"]["generation"] == before["metadata"]["generation"]
    assert result.status.shards is not None and result.status.shards.bytes == SUMMARY["bytes"]
