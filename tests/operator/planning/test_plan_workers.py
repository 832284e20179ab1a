"""The worker group (planning/workers.py): ready, degraded, pods that cannot start, group
restarts within the budget, bad input, and new templates rolled out together."""

from __future__ import annotations

import copy
import json
from datetime import timedelta

import pytest
from fake_cluster import (
    SUMMARY,
    TWO_NODES,
    FakeCluster,
    cond,
    pod_status,
    template_revision,
    waiting_container,
)


def test_ready_then_degraded_then_ready() -> None:
    cluster = FakeCluster(TWO_NODES)
    result = cluster.until_ready()
    assert result.phase == "Ready"
    assert result.status.to_dict()["readyWorkers"] == "2/2"
    for kind in ("Validated", "Sharded", "WorkersReady", "Ready"):
        assert cond(result, kind)["status"] == "True", kind
    assert result.status.message == "serving DeepSeek-R1 at http://r1.llm.svc:1025/v1"
    cluster.pods["r1-worker-1"]["status"].update(pod_status(ready=False))
    result = cluster.step()
    assert result.phase == "Degraded"
    assert [e.type for e in result.events] == ["Warning"]
    cluster.pods["r1-worker-1"]["status"].update(pod_status(ready=True))
    assert cluster.step().phase == "Ready"


@pytest.mark.parametrize(
    "container_name,reason,condition",
    [
        ("engine", "ImagePullBackOff", "ImagePullFailed"),
        ("stage", "ErrImagePull", "ImagePullFailed"),
        ("engine", "CreateContainerConfigError", "ContainerConfigError"),
    ],
)
def test_a_worker_that_cannot_start_says_why(
    container_name: str, reason: str, condition: str
) -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    cluster.finish_job(cluster.job(), message=json.dumps(SUMMARY))
    cluster.step()
    cluster.run_workers(ready=False)
    message = 'secret "hf-token" not found'
    status = cluster.pods["r1-worker-1"]["status"]
    status["containerStatuses"] = []
    key = "initContainerStatuses" if container_name == "stage" else "containerStatuses"
    status[key] = [waiting_container(container_name, reason, message)]
    result = cluster.step()
    workers = cond(result, "WorkersReady")
    assert (workers["status"], workers["reason"]) == ("False", condition)
    assert f"pod r1-worker-1 container {container_name}: {reason}: {message}" in workers["message"]
    assert result.phase == "Pending"


def test_a_restarted_worker_restarts_the_whole_group_within_the_budget() -> None:
    cluster = FakeCluster(TWO_NODES)  # restartBudget 2
    cluster.until_ready()
    for n in (1, 2):
        cluster.pods["r1-worker-1"]["status"].update(pod_status(ready=False, restarts=1))
        result = cluster.step()
        assert sorted(d.name for d in result.delete) == ["r1-worker-0", "r1-worker-1"]
        assert result.status.group_restarts == n
        assert result.phase == "Degraded"
        assert cond(result, "WorkersReady")["reason"] == "GroupRestarting"
        assert ("Warning", "GroupRestart") in [(e.type, e.reason) for e in result.events]
        assert f"group restart {n} of 2" in result.status.message
        cluster.run_workers()
        assert cluster.step().phase == "Ready"
    cluster.pods["r1-worker-0"]["status"] = {"phase": "Failed", "reason": "Evicted"}
    result = cluster.step()
    assert result.phase == "Failed" and not result.delete
    assert cond(result, "WorkersReady")["reason"] == "RestartBudgetExhausted"
    assert "Evicted" in result.status.message
    # Failed holds, even if the pods look fine again, until the spec changes.
    cluster.pods["r1-worker-0"]["status"].update(pod_status(ready=True))
    again = cluster.step()
    assert again.phase == "Failed" and not again.delete and not again.events
    cluster.change_spec({"worker": {"restartBudget": 3}})
    cluster.pods["r1-worker-0"]["status"] = {"phase": "Failed", "reason": "Evicted"}
    result = cluster.step()
    assert result.status.group_restarts == 1 and len(result.delete) == 2


def test_a_worker_that_exits_with_bad_input_fails_at_once_without_restarts() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    msg = "layer 3 expert 7: shard shape (64, 7168) does not match the plan"
    status = {**cluster.pods["r1-worker-1"]["status"], **pod_status(ready=False, restarts=1)}
    status["containerStatuses"][0]["lastState"] = {
        "terminated": {"exitCode": 2, "reason": "Error", "message": json.dumps({"error": msg})}
    }
    cluster.pods["r1-worker-1"]["status"] = status
    result = cluster.step()
    assert result.phase == "Failed" and not result.delete
    assert result.status.group_restarts == 0
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ConfigMismatch")
    assert msg in validated["message"] and "r1-worker-1" in validated["message"]
    assert cond(result, "WorkersReady")["reason"] == "ConfigMismatch"
    assert "GroupRestart" not in [e.reason for e in result.events]
    # It holds (the crash-looping pod may even look fine for a moment) until the spec changes.
    cluster.pods["r1-worker-1"]["status"] = {**status, **pod_status(ready=True)}
    again = cluster.step()
    assert again.phase == "Failed" and not again.delete and not again.events
    assert cond(again, "Validated")["reason"] == "ConfigMismatch"
    # A spec change tries again: the group restarts with fresh pods.
    cluster.pods["r1-worker-1"]["status"] = status
    cluster.change_spec({"worker": {"restartBudget": 3}})
    result = cluster.step()
    assert sorted(d.name for d in result.delete) == ["r1-worker-0", "r1-worker-1"]
    assert result.status.group_restarts == 1
    for name in ("r1-worker-0", "r1-worker-1"):
        cluster.pods.pop(name, None)
    cluster.run_workers()
    assert cluster.step().phase == "Ready"


def test_a_stager_that_said_bad_input_is_rolled_away_by_a_spec_change() -> None:
    """The stager (an init container) exits 2: Failed at once. A new spec changes the template;
    the old pods are stale, not evidence against the new spec, so the group rolls."""
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    status = pod_status(ready=False)
    status["phase"] = "Pending"
    status["initContainerStatuses"] = [
        {
            "name": "stage",
            "restartCount": 2,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 2, "message": "error: disk full"}},
        }
    ]
    cluster.pods["r1-worker-1"]["status"] = status
    result = cluster.step()
    assert result.phase == "Failed" and cond(result, "WorkersReady")["reason"] == "ConfigMismatch"
    cluster.change_spec({"worker": {"env": [{"name": "FOO", "value": "1"}]}})
    phases = []
    deleted: list[str] = []
    for settle in (False, False, True, False, False):  # the StatefulSet controller lags a pass
        if settle:
            cluster.run_workers()
        result = cluster.step()
        phases.append(result.phase)
        deleted += [d.name for d in result.delete]
    assert "Failed" not in phases and sorted(deleted) == ["r1-worker-0", "r1-worker-1"]


def test_the_restart_budget_comes_back_after_ten_minutes_of_serving() -> None:
    cluster = FakeCluster(TWO_NODES)  # restartBudget 2
    cluster.until_ready()
    for _ in range(2):
        cluster.pods["r1-worker-1"]["status"].update(pod_status(ready=False, restarts=1))
        assert cluster.step().phase == "Degraded"
        cluster.run_workers()
        assert cluster.step().phase == "Ready"
    assert cluster.body["status"]["groupRestarts"] == 2
    cluster.now += timedelta(minutes=9)
    result = cluster.step()
    assert result.status.group_restarts == 2 and not result.events
    cluster.now += timedelta(minutes=1)
    result = cluster.step()
    assert result.status.group_restarts == 0
    assert [e.reason for e in result.events] == ["RestartBudgetReset"]
    assert cluster.step().events == []
    # The whole budget again: two more group restarts before Failed.
    for n in (1, 2):
        cluster.pods["r1-worker-0"]["status"].update(pod_status(ready=False, restarts=1))
        assert cluster.step().status.group_restarts == n
        cluster.run_workers()
        assert cluster.step().phase == "Ready"


def test_a_failed_pod_seen_only_in_an_event_still_counts() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    gone = copy.deepcopy(cluster.pods.pop("r1-worker-1"))
    gone["status"] = {"phase": "Failed", "reason": "Evicted"}
    result = cluster.step(failed_pods=[gone])
    assert result.status.group_restarts == 1
    assert result.counted_failures == [gone["metadata"]["uid"]]
    assert [d.name for d in result.delete] == ["r1-worker-0"]


def test_new_template_replaces_all_pods_together_without_counting() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    cluster.change_spec({"serving": {"maxBatchSize": 64}})  # same shards, new engine config
    result = cluster.step()
    assert result.phase == "Degraded"  # was serving this plan
    sts = cluster.sts()
    assert sts["metadata"]["generation"] == 2
    sts["status"]["observedGeneration"] = 2
    sts["status"]["updateRevision"] = template_revision(sts["spec"]["template"])
    result = cluster.step()
    assert sorted(d.name for d in result.delete) == ["r1-worker-0", "r1-worker-1"]
    assert "RollingOut" in [e.reason for e in result.events]
    assert result.status.group_restarts == 0
    cluster.run_workers()
    assert cluster.step().phase == "Ready"
