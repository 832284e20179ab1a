"""The sharding Job's life beyond the happy path (issue 16): its completion outlives the Job,
a Job that has not completed is replaced when the spec changes its pod, and earlier plans'
directories are removed only for the Job that wrote them and never beside a live writer."""

from __future__ import annotations

import copy
from typing import Any

from fake_cluster import SUMMARY, TWO_NODES, FakeCluster, cond, container, kinds

from deepseek_operator.planning import names

OTHER_PLAN = {"parallelism": {"dp": 1, "tp": 16}}
FIRST_PLAN = {"parallelism": {"dp": 2, "tp": 8}}


def sharders(cluster: FakeCluster) -> dict[str, dict[str, Any]]:
    return {n: o for (k, n), o in cluster.objects.items() if k == "Job" and "-shard-" in n}


def cleanups(cluster: FakeCluster) -> dict[str, dict[str, Any]]:
    return {n: o for (k, n), o in cluster.objects.items() if k == "Job" and "-clean-" in n}


def reasons(cluster: FakeCluster) -> list[str]:
    return [e.reason for p in cluster.plans for e in p.events]


def roll_and_serve(cluster: FakeCluster) -> None:
    """The new sharding Job completes, the group rolls to the new template and turns Ready."""
    cluster.finish_job(sharders(cluster)[names.shard_job("r1", cluster.fp())], message="{}")
    cluster.step()  # the new template
    sts = cluster.sts()
    sts["status"] = {"observedGeneration": sts["metadata"]["generation"], "updateRevision": "x"}
    cluster.step()  # stale pods deleted together
    cluster.run_workers()
    assert cluster.step().phase == "Ready"


# --------------------------------------------------------------------- 16.6 completion


def test_a_deleted_completed_sharding_job_leaves_a_serving_deployment_alone() -> None:
    cluster = FakeCluster(TWO_NODES)
    assert cluster.until_ready().phase == "Ready"
    shards = cluster.body["status"]["shards"]
    assert shards["complete"] is True and shards["fingerprint"] == cluster.fp()
    before = copy.deepcopy(cluster.sts())
    job = cluster.job()
    del cluster.objects[("Job", job["metadata"]["name"])]  # by hand, or a TTL controller
    for name in [n for n, p in cluster.pods.items() if "-shard-" in n]:
        del cluster.pods[name]
    for _ in range(3):
        result = cluster.step()
        assert result.phase == "Ready", result.status.message
        assert not [o for o in result.apply if o["kind"] == "Job"], kinds(result)
        assert not result.delete
    sharded = cond(result, "Sharded")
    assert (sharded["status"], sharded["reason"]) == ("True", "ShardsComplete")
    assert "recorded in the status" in sharded["message"] and "_COMPLETE" in sharded["message"]
    assert cluster.sts()["spec"] == before["spec"]
    assert result.status.shards is not None and result.status.shards.bytes == SUMMARY["bytes"]


def test_recorded_completion_is_per_plan() -> None:
    """The record is for one fingerprint: a new plan whose Job is gone is sharded again."""
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    cluster.change_spec(OTHER_PLAN)
    result = cluster.step()
    assert ("Job", names.shard_job("r1", cluster.fp())) in kinds(result)
    assert not result.status.shards or not result.status.shards.complete


# --------------------------------------------------------------------- 16.13 replacement


def unschedulable_pod(cluster: FakeCluster, job: dict[str, Any]) -> None:
    name = job["metadata"]["name"]
    cluster.pods[f"{name}-x"] = {
        "metadata": {
            "name": f"{name}-x",
            "uid": f"{name}-x",
            "labels": {**job["spec"]["template"]["metadata"]["labels"], names.JOB_NAME_LABEL: name},
        },
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "message": "0/3 nodes: Insufficient"}
            ],
        },
    }


def test_a_spec_change_replaces_a_sharding_job_that_has_not_completed() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.change_spec({"sharding": {"resources": {"requests": {"cpu": "5000"}}}})
    cluster.step()
    job = cluster.job()
    unschedulable_pod(cluster, job)
    assert cluster.step().phase == "Pending"
    cluster.change_spec({"sharding": {"resources": {"requests": {"cpu": "4"}}}})
    result = cluster.step()
    assert cluster.fp() == job["metadata"]["annotations"][names.FINGERPRINT_ANNOTATION]
    [gone] = result.delete
    assert (gone.kind, gone.name, gone.uid) == ("Job", job["metadata"]["name"], "uid-2")
    assert gone.propagation == "Foreground"  # the new pod starts once the old one is gone
    assert "ReplacingShardingJob" in [e.reason for e in result.events]
    result = cluster.step()
    new = cluster.job()
    assert container(new, "shard")["resources"] == {"requests": {"cpu": "4"}}
    assert result.phase == "Sharding"
    assert not cluster.step().delete  # the new one is kept


def test_a_completed_sharding_job_is_never_replaced() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    job = cluster.job()
    cluster.change_spec({"sharding": {"resources": {"requests": {"cpu": "4"}}}})
    for _ in range(2):
        result = cluster.step()
        assert not result.delete and result.phase == "Ready"
    assert cluster.job() is job


def test_a_sharding_job_of_an_earlier_version_is_left_to_finish() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    del cluster.job()["metadata"]["annotations"][names.TEMPLATE_ANNOTATION]
    cluster.change_spec({"sharding": {"resources": {"requests": {"cpu": "4"}}}})
    assert not cluster.step().delete


# --------------------------------------------------------------------- 16.5 cleanup


def test_switching_back_and_forth_never_takes_an_old_cleanup_as_proof() -> None:
    """A -> B -> A -> B within the cleanup Jobs' TTL: each sharding Job's directory is removed
    by a cleanup Job made for that Job, and OldShardsRemoved follows only such a cleanup."""
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    fp_a = cluster.fp()
    cluster.change_spec(OTHER_PLAN)  # B
    cluster.step()
    roll_and_serve(cluster)
    fp_b = cluster.fp()
    clean_a = names.cleanup_job("r1", fp_a)
    first = cleanups(cluster)[clean_a]
    shard_a1 = sharders(cluster)[names.shard_job("r1", fp_a)]
    assert (
        first["metadata"]["annotations"][names.CLEANS_UID_ANNOTATION]
        == (shard_a1["metadata"]["uid"])
    )
    assert first["spec"]["suspend"] is False
    cluster.finish_job(first)
    cluster.step()
    assert names.shard_job("r1", fp_a) not in sharders(cluster)
    assert reasons(cluster).count("OldShardsRemoved") == 1

    cluster.change_spec(FIRST_PLAN)  # A again, while clean-A (complete) is kept for its TTL
    result = cluster.step()
    assert cluster.fp() == fp_a
    # A's completed cleanup is history: no proof about the Job about to write A again.
    assert ("Job", clean_a) in [(d.kind, d.name) for d in result.delete]
    assert ("Job", names.shard_job("r1", fp_a)) in kinds(result)
    roll_and_serve(cluster)
    clean_b = cleanups(cluster)[names.cleanup_job("r1", fp_b)]
    cluster.finish_job(clean_b)
    cluster.step()
    assert reasons(cluster).count("OldShardsRemoved") == 2

    cluster.change_spec(OTHER_PLAN)  # B again
    cluster.step()
    cluster.step()
    roll_and_serve(cluster)
    before = reasons(cluster).count("OldShardsRemoved")
    shard_a2 = sharders(cluster)[names.shard_job("r1", fp_a)]
    for _ in range(3):
        cluster.step()
    # A's second directory: a cleanup for the second A Job, and no word of removal before it ran.
    clean = cleanups(cluster)[clean_a]
    assert (
        clean["metadata"]["annotations"][names.CLEANS_UID_ANNOTATION]
        == (shard_a2["metadata"]["uid"])
    )
    assert reasons(cluster).count("OldShardsRemoved") == before
    assert names.shard_job("r1", fp_a) in sharders(cluster)
    cluster.finish_job(clean)
    cluster.step()
    assert reasons(cluster).count("OldShardsRemoved") == before + 1
    assert names.shard_job("r1", fp_a) not in sharders(cluster)


def test_reverting_while_the_new_plan_still_shards_stops_that_writer_before_cleaning() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    cluster.change_spec(OTHER_PLAN)  # B: its sharding Job starts, A keeps serving
    cluster.step()
    fp_b = cluster.fp()
    shard_b = sharders(cluster)[names.shard_job("r1", fp_b)]
    cluster.change_spec(FIRST_PLAN)  # back to A while B's sharder writes
    # The Foreground delete leaves B's Job terminating until its pod is gone.
    real_delete_jobs: list[str] = []
    result = cluster_step_keeping_terminating(cluster, real_delete_jobs)
    assert result.phase == "Ready"
    clean_b = cleanups(cluster)[names.cleanup_job("r1", fp_b)]
    assert clean_b["spec"]["suspend"] is True  # never beside the live writer
    assert (
        clean_b["metadata"]["annotations"][names.CLEANS_UID_ANNOTATION]
        == (shard_b["metadata"]["uid"])
    )
    assert real_delete_jobs == [shard_b["metadata"]["name"]]
    assert "StoppingOldSharding" in [e.reason for e in result.events]
    for _ in range(2):  # B's Job terminating: its pod may still write
        cluster_step_keeping_terminating(cluster, real_delete_jobs)
        assert cleanups(cluster)[clean_b["metadata"]["name"]]["spec"]["suspend"] is True
    del cluster.objects[("Job", shard_b["metadata"]["name"])]  # gone, with its pod
    result = cluster.step()
    assert cleanups(cluster)[clean_b["metadata"]["name"]]["spec"]["suspend"] is False
    assert "RemovingOldShards" in [e.reason for e in result.events]
    rm = container(cleanups(cluster)[clean_b["metadata"]["name"]], "cleanup")
    assert rm["args"] == ["-rf", "--", f"/store/{fp_b[:16]}"]


def cluster_step_keeping_terminating(cluster: FakeCluster, deleted: list[str]) -> Any:
    """A step whose Foreground deletes leave the Job terminating (as the API server does while
    the Job's pods are going)."""
    jobs = {n: o for (k, n), o in cluster.objects.items() if k == "Job"}
    result = cluster.step()
    for gone in result.delete:
        if gone.kind == "Job" and gone.propagation == "Foreground":
            deleted.append(gone.name)
            job = jobs[gone.name]
            job["metadata"]["deletionTimestamp"] = "2026-01-02T03:04:05Z"
            cluster.objects[("Job", gone.name)] = job
    return result


def test_switching_back_to_a_plan_whose_cleanup_runs_waits_for_it() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    fp_a = cluster.fp()
    cluster.change_spec(OTHER_PLAN)
    cluster.step()
    roll_and_serve(cluster)
    clean_a = names.cleanup_job("r1", fp_a)
    assert cleanups(cluster)[clean_a]["spec"]["suspend"] is False  # rm -rf of A runs
    cluster.change_spec(FIRST_PLAN)
    for _ in range(2):
        result = cluster.step()
        assert "waiting for cleanup Job" in cond(result, "Sharded")["message"]
        # A's old Job (complete) is not taken as A's shards while they are being removed.
        assert not [o for o in result.apply if o["kind"] == "StatefulSet"]
    cluster.finish_job(cleanups(cluster)[clean_a])
    result = cluster.step()
    assert {(d.kind, d.name) for d in result.delete} == {
        ("Job", clean_a),
        ("Job", names.shard_job("r1", fp_a)),
    }
    assert "RetryingSharding" in [e.reason for e in result.events]
    result = cluster.step()
    assert ("Job", names.shard_job("r1", fp_a)) in kinds(result)
    assert result.phase == "Sharding"


# --------------------------------------------------------------------- 16.8 FailedCreate

QUOTA = (
    'Error creating: pods "x" is forbidden: exceeded quota: q, requested: pods=1, used: pods=0, '
    "limited: pods=0"
)


def test_a_sharding_pod_that_cannot_be_created_is_named_in_the_condition() -> None:
    cluster = FakeCluster(TWO_NODES)
    first = cluster.step()
    assert first.recheck  # no pod yet: look again without waiting for an event
    job = cluster.job()["metadata"]["name"]
    result = cluster.step(creation_failures={f"Job {job}": QUOTA})
    sharded = cond(result, "Sharded")
    assert (sharded["status"], sharded["reason"]) == ("False", "PodCreationFailed")
    assert QUOTA in sharded["message"] and job in sharded["message"]
    assert result.phase == "Pending" and "exceeded quota" in (result.status.message or "")
    assert result.recheck


def test_worker_pods_that_cannot_be_created_are_named_in_the_condition() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    sts = cluster.sts()["metadata"]["name"]
    del cluster.pods[f"{sts}-1"]
    result = cluster.step(creation_failures={f"StatefulSet {sts}": QUOTA})
    workers = cond(result, "WorkersReady")
    assert (workers["status"], workers["reason"]) == ("False", "PodCreationFailed")
    assert "cannot create 1 pod(s)" in workers["message"] and QUOTA in workers["message"]
    assert result.recheck
    cluster.run_workers()
    result = cluster.step()
    assert result.phase == "Ready" and not result.recheck


def test_only_jobs_and_statefulsets_short_of_pods_are_asked_about() -> None:
    from deepseek_operator.planning.observed import Observed, short_of_pods

    def job(name: str, **status: Any) -> dict[str, Any]:
        return {"metadata": {"name": name, "uid": name}, "spec": {}, "status": status}

    done = job("done", conditions=[{"type": "Complete", "status": "True"}])
    waiting = job("waiting")
    running = job("running")
    suspended = {**job("suspended"), "spec": {"suspend": True}}
    pod = {"metadata": {"name": "p", "labels": {names.JOB_NAME_LABEL: "running"}}}
    sts = {"metadata": {"name": "w", "uid": "w"}, "spec": {"replicas": 2}}
    worker = {"metadata": {"name": "w-0", "ownerReferences": [{"controller": True, "uid": "w"}]}}
    observed = Observed(
        jobs=[done, waiting, running, suspended], statefulsets=[sts], pods=[pod, worker]
    )
    found = [(kind, o["metadata"]["name"]) for kind, o in short_of_pods(observed)]
    assert found == [("Job", "waiting"), ("StatefulSet", "w")]
