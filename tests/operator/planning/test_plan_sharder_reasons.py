"""The sharder's termination reason (issue 16.10): {"error": ..., "reason": ...} with a reason from
dsworker.contract.errors. Infrastructure (a missing source, a full, read-only or busy store) is
Sharded False with its own reason and a fix naming the field, the spec still Validated; a plan or
config.json that cannot work stays a validation failure."""

from __future__ import annotations

import json

import pytest
from fake_cluster import TWO_NODES, FakeCluster, cond

from dsworker.contract import errors


def failed(reason: str | None, error: str, code: int = 2) -> tuple[FakeCluster, object]:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    record = {"error": error} | ({"reason": reason} if reason else {})
    cluster.finish_job(cluster.job(), ok=False, message=json.dumps(record), code=code)
    return cluster, cluster.step()


@pytest.mark.parametrize(
    "reason,error,code,fix",
    [
        (
            errors.SOURCE_MISSING,
            "/models/DeepSeek-R1/config.json does not exist",
            2,
            "check that spec.model.source.pvc (claim models, path 'DeepSeek-R1/') holds the "
            "checkpoint's config.json",
        ),
        (
            errors.STORAGE_FULL,
            "No space left on device writing rank-0/model.safetensors",
            2,
            "give spec.sharding.store.pvc (claim shards) room for the shards",
        ),
        (
            errors.STORAGE_NOT_WRITABLE,
            "/shards is a read-only file system",
            2,
            "make spec.sharding.store.pvc (claim shards) writable",
        ),
        (
            errors.OUTPUT_BUSY,
            "another writer holds /shards/abc",
            errors.EXIT_BUSY,
            "another writer holds the shard directory",
        ),
    ],
)
def test_infrastructure_reasons_are_their_own_sharded_reason(
    reason: str, error: str, code: int, fix: str
) -> None:
    cluster, result = failed(reason, error, code)
    sharded = cond(result, "Sharded")
    assert (sharded["status"], sharded["reason"]) == ("False", reason)
    assert error in sharded["message"] and fix in sharded["message"]
    job = cluster.job()["metadata"]["name"]
    assert f"then delete Job {job} (or change the spec) to run it again" in sharded["message"]
    validated = cond(result, "Validated")
    assert validated["status"] == "True", validated  # the spec is fine; the infrastructure is not
    assert result.phase == "Failed" and result.status.message == sharded["message"]
    assert not any(k == "StatefulSet" for k, _ in cluster.objects)
    assert not cluster.step().delete  # terminal: nothing re-runs by itself


def test_deleting_the_failed_job_runs_it_again() -> None:
    cluster, _ = failed(errors.SOURCE_MISSING, "no config.json")
    name = cluster.job()["metadata"]["name"]
    del cluster.objects[("Job", name)]
    cluster.pods.clear()
    result = cluster.step()
    assert ("Job", name) in cluster.objects
    assert cond(result, "Sharded")["reason"] == "ShardingPending"


@pytest.mark.parametrize(
    "reason,validated_reason",
    [
        (errors.INVALID_MODEL_CONFIG, "InvalidModelConfig"),
        (errors.CONFIG_MISMATCH, "ConfigMismatch"),
        (None, "ConfigMismatch"),  # an older sharder: no reason
        ("SomethingNew", "ConfigMismatch"),
    ],
)
def test_bad_input_stays_a_validation_failure(reason: str | None, validated_reason: str) -> None:
    error = "config.json: n_group must be an integer in [1, 2147483647], got 0; fix config.json"
    _, result = failed(reason, error)
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"], validated["message"]) == (
        "False",
        validated_reason,
        error,
    )
    assert cond(result, "Sharded")["reason"] == "ShardingFailed"
    assert result.phase == "Failed"
