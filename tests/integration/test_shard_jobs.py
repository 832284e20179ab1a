"""The sharding Job and its neighbours against a real control plane (issue 16): a completed Job
deleted by hand (also one node's Job of node-local shards), a Job replaced after the spec fixes
its pod, a plan reverted while the new one still shards, pods a ResourceQuota refuses, a child
the API server fails to store."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client
from test_operator import UNSCHEDULABLE, deployment, shard_job, sts_of

from conftest import Dsd, OperatorProcess
from deepseek_operator.planning import names

pytestmark = pytest.mark.integration


def sharders(dsd: Dsd) -> dict[str, Any]:
    return {j.metadata.name: j for j in dsd.jobs("sharder")}


def test_deleting_the_completed_sharding_job_keeps_a_serving_deployment_serving(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(deployment("keep"))
    dsd.wait_phase("keep", "Ready")
    assert dsd.status("keep")["shards"]["complete"] is True
    [job] = dsd.jobs("sharder")
    sts_generation = sts_of(dsd, "keep").metadata.generation
    dsd.batch.delete_namespaced_job(
        job.metadata.name, dsd.namespace, propagation_policy="Background"
    )
    dsd.wait("Job gone", lambda: not dsd.jobs("sharder"))
    deadline = time.monotonic() + 8  # events of the deletion, and a pass or two after them
    while time.monotonic() < deadline:
        status = dsd.status("keep")
        assert status["phase"] == "Ready", status
        assert not dsd.jobs("sharder"), "the shards were written again"
        time.sleep(0.5)
    sharded = dsd.condition("keep", "Sharded")
    assert sharded["reason"] == "ShardsComplete" and "recorded in the status" in sharded["message"]
    assert sts_of(dsd, "keep").metadata.generation == sts_generation


def test_deleting_a_completed_node_local_sharding_job_keeps_serving(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    """Node-local shards on two nodes: one node's completed Job deleted by hand is not run again;
    its completion stays recorded per node in the status."""
    nodes = ["kwok-npu-0", "kwok-npu-1"]
    dsd.create(
        deployment(
            "keepn",
            parallelism={"nodes": 2, "devicesPerNode": 2, "tp": 2, "moeTp": 2},
            sharding={"store": {"pvc": None, "hostPath": {"path": "/dev/shm/dsd", "nodes": nodes}}},
        )
    )
    status = dsd.wait_phase("keepn", "Ready", timeout=120)
    recorded = status["shards"]["nodes"]
    assert [(n["node"], n.get("complete")) for n in recorded] == [(m, True) for m in nodes]
    jobs = sharders(dsd)
    first = names.shard_job("keepn", status["fingerprint"], 0)
    assert recorded[0]["jobUid"] == jobs[first].metadata.uid
    sts_generation = sts_of(dsd, "keepn").metadata.generation
    dsd.batch.delete_namespaced_job(first, dsd.namespace, propagation_policy="Background")
    dsd.wait("node Job gone", lambda: first not in sharders(dsd))
    deadline = time.monotonic() + 8  # events of the deletion, and a pass or two after them
    while time.monotonic() < deadline:
        status = dsd.status("keepn")
        assert status["phase"] == "Ready", status
        assert first not in sharders(dsd), "node 0's shards were written again"
        time.sleep(0.5)
    assert dsd.condition("keepn", "Sharded")["reason"] == "ShardsComplete"
    assert status["shards"]["nodes"][0]["complete"] is True
    assert sts_of(dsd, "keepn").metadata.generation == sts_generation


def test_fixing_an_unschedulable_sharding_pod_replaces_the_job(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(deployment("fix", sharding={"resources": UNSCHEDULABLE}))
    stuck = shard_job(dsd, "fix")
    dsd.wait(
        "unschedulable sharder reported",
        lambda: "cannot be scheduled" in dsd.condition("fix", "Sharded").get("message", ""),
    )
    dsd.patch_spec("fix", {"sharding": {"resources": {"requests": {"cpu": "1"}}}})
    dsd.wait_phase("fix", "Ready")
    [job] = dsd.jobs("sharder")
    assert job.metadata.name == stuck.metadata.name and job.metadata.uid != stuck.metadata.uid
    assert job.spec.template.spec.containers[0].resources.requests == {"cpu": "1"}
    assert "ReplacingShardingJob" in dsd.event_reasons("fix")


def test_reverting_while_the_new_plan_shards_stops_its_writer_before_cleaning(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.create(deployment("rv", parallelism={"nodes": 2, "devicesPerNode": 2, "tp": 4}))
    dsd.wait_phase("rv", "Ready")
    fp_a = dsd.status("rv")["fingerprint"]
    dsd.patch_spec(
        "rv", {"parallelism": {"tp": 2, "dp": 2}, "sharding": {"resources": UNSCHEDULABLE}}
    )
    dsd.wait("plan B", lambda: dsd.status("rv").get("fingerprint") not in (fp_a, None))
    job_b = shard_job(dsd, "rv")
    fp_b = dsd.status("rv")["fingerprint"]
    assert job_b.status.succeeded is None  # still running (its pod waits for a node)
    dsd.patch_spec("rv", {"parallelism": {"tp": 4, "dp": 1}, "sharding": {"resources": None}})
    dsd.wait(
        "B's sharding Job stopped",
        lambda: job_b.metadata.name not in sharders(dsd),
    )
    cleanup_name = names.cleanup_job("rv", fp_b)
    cleanup = dsd.wait(
        "cleanup of B done",
        lambda: (
            (
                c := next(
                    (j for j in dsd.jobs("shard-cleanup") if j.metadata.name == cleanup_name), None
                )
            )
            and c.status.succeeded
            and c
        ),
    )
    notes = cleanup.metadata.annotations
    assert notes[names.CLEANS_UID_ANNOTATION] == job_b.metadata.uid
    assert cleanup.spec.template.spec.containers[0].args == ["-rf", "--", f"/store/{fp_b[:16]}"]
    # The cleanup pod started only after B's sharder had gone.
    [pod] = dsd.pods(f"batch.kubernetes.io/job-name={cleanup_name}")
    reasons = dsd.event_reasons("rv")
    assert "StoppingOldSharding" in reasons and "RemovingOldShards" in reasons
    assert not dsd.pods(f"batch.kubernetes.io/job-name={job_b.metadata.name}")
    assert pod.metadata.creation_timestamp is not None
    assert dsd.status("rv")["phase"] == "Ready" and dsd.status("rv")["fingerprint"] == fp_a


def test_pods_a_resource_quota_refuses_are_named_in_the_status(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    dsd.core.create_namespaced_resource_quota(
        dsd.namespace,
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-pods"},
            "spec": {"hard": {"pods": "0"}},
        },
    )
    dsd.wait(
        "quota counted",
        lambda: dsd.core.read_namespaced_resource_quota("no-pods", dsd.namespace).status.hard,
    )
    dsd.create(deployment("quota"))
    dsd.create(
        deployment(
            "quota-w",
            model={"architecture": "DeepseekV2"},
            sharding={"enabled": False, "store": None},
        )
    )
    sharded = dsd.wait(
        "sharder refused",
        lambda: (c := dsd.condition("quota", "Sharded")).get("reason") == "PodCreationFailed" and c,
        timeout=60,
    )
    assert "exceeded quota: no-pods" in sharded["message"], sharded
    assert dsd.status("quota")["phase"] == "Pending"
    workers = dsd.wait(
        "workers refused",
        lambda: (
            (c := dsd.condition("quota-w", "WorkersReady")).get("reason") == "PodCreationFailed"
            and c
        ),
        timeout=60,
    )
    assert "exceeded quota: no-pods" in workers["message"], workers
    dsd.core.delete_namespaced_resource_quota("no-pods", dsd.namespace)
    dsd.wait_phase("quota-w", "Ready", timeout=120)


def test_a_child_the_api_server_fails_to_store_is_reported_and_retried(
    running_operator: OperatorProcess, dsd: Dsd, k8s: Any
) -> None:
    """A validating webhook that cannot be reached (failurePolicy Fail) makes the API server
    answer 500 for the StatefulSet: not a 4xx, yet it must end in the status, naming the child
    and the API server's message, and be retried until it passes."""
    admission = client.AdmissionregistrationV1Api(k8s)
    hook = f"dsop-broken-{dsd.namespace}"
    admission.create_validating_webhook_configuration(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": hook},
            "webhooks": [
                {
                    "name": "broken.dsop.test",
                    "clientConfig": {"url": "https://127.0.0.1:1/validate"},
                    "rules": [
                        {
                            "apiGroups": ["apps"],
                            "apiVersions": ["v1"],
                            "resources": ["statefulsets"],
                            "operations": ["CREATE", "UPDATE"],
                        }
                    ],
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": dsd.namespace}
                    },
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 2,
                }
            ],
        }
    )
    try:
        dsd.create(
            deployment(
                "hooked",
                model={"architecture": "DeepseekV2"},
                sharding={"enabled": False, "store": None},
            )
        )
        validated = dsd.wait(
            "apply failure reported",
            lambda: (
                (c := dsd.condition("hooked", "Validated")).get("reason") == "ChildApplyFailed"
                and c
            ),
        )
        assert "StatefulSet hooked-worker" in validated["message"], validated
        assert "500" in validated["message"] and "broken.dsop.test" in validated["message"]
        assert dsd.status("hooked")["phase"] == "Failed"
        dsd.wait("Event", lambda: "ChildApplyFailed" in dsd.event_reasons("hooked"))
    finally:
        admission.delete_validating_webhook_configuration(hook)
    dsd.wait_phase("hooked", "Ready")  # retried with backoff, without any event
