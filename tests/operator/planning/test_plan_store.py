"""The shard store claim (planning/store.py): created by the operator, grown with the spec, never
shrunk, and every refusal or unfinished expansion reported with its fix."""

from __future__ import annotations

import copy

from fake_cluster import (
    TWO_NODES,
    FakeCluster,
    cond,
)

from deepseek_operator.planning import Plan, plan


def test_operator_created_store_claim() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["sharding"]["store"] = {"pvc": {"storageClassName": "nfs", "size": "2Ti"}}
    cluster = FakeCluster(body)
    result = cluster.step()
    claim = next(o for o in result.apply if o["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "r1-shards"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "nfs",
        "resources": {"requests": {"storage": "2Ti"}},
    }
    job = next(o for o in result.apply if o["kind"] == "Job")
    store = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "store")
    assert store["persistentVolumeClaim"]["claimName"] == "r1-shards"
    # Not bound yet: Pending, with the claim named; the claim is created once only.
    assert result.phase == "Pending"
    assert cond(result, "Sharded")["reason"] == "StoreNotBound"
    assert "r1-shards" in result.status.message
    again = cluster.step()
    assert "PersistentVolumeClaim" not in {o["kind"] for o in again.apply}
    cluster.objects[("PersistentVolumeClaim", "r1-shards")]["status"] = {"phase": "Bound"}
    assert cluster.step().phase == "Sharding"


def store_cluster(size: str) -> FakeCluster:
    """A Ready deployment on a store claim the operator created, Bound at that size."""
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["sharding"]["store"] = {"pvc": {"storageClassName": "nfs", "size": size}}
    cluster = FakeCluster(body)
    cluster.step()
    claim = cluster.objects[("PersistentVolumeClaim", "r1-shards")]
    claim["status"] = {"phase": "Bound", "capacity": {"storage": size}}
    cluster.until_ready()
    assert cluster.plans[-1].phase == "Ready"
    return cluster


def apply_resize(cluster: FakeCluster, result: Plan) -> None:
    """What the API server does with the resize: only the request changes."""
    assert result.resize is not None
    claim = cluster.objects[("PersistentVolumeClaim", "r1-shards")]
    claim["spec"] = copy.deepcopy(result.resize["spec"])


def test_store_claim_grows_with_the_spec_and_nothing_else_moves() -> None:
    cluster = store_cluster("1Gi")
    created = copy.deepcopy(cluster.objects[("PersistentVolumeClaim", "r1-shards")])
    sts_generation = cluster.sts()["metadata"]["generation"]
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    result = cluster.step()
    assert result.resize is not None
    assert result.resize["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "nfs",
        "resources": {"requests": {"storage": "2Gi"}},
    }
    # Every other field the operator owns is applied with the value the claim has.
    for key in ("name", "namespace", "labels", "annotations", "ownerReferences"):
        assert result.resize["metadata"][key] == created["metadata"][key], key
    assert "PersistentVolumeClaim" not in {o["kind"] for o in result.apply}
    resized = [e for e in result.events if e.reason == "ResizingStore"]
    assert [e.type for e in resized] == ["Normal"] and "from 1Gi to 2Gi" in resized[0].message
    assert result.phase == "Ready" and cond(result, "Validated")["reason"] == "Valid"
    assert result.status.fingerprint == cluster.plans[-2].status.fingerprint  # no re-shard
    apply_resize(cluster, result)
    again = cluster.step()
    assert again.resize is None and again.events == []
    assert cluster.sts()["metadata"]["generation"] == sts_generation
    # The same size written another way is no change.
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2048Mi"}}}})
    assert cluster.step().resize is None


def test_store_claim_never_shrinks_and_says_why() -> None:
    cluster = store_cluster("2Gi")
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "1Gi"}}}})
    result = cluster.step()
    assert result.resize is None
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"]) == ("True", "StoreSpecNotApplied")
    assert validated["message"].startswith("spec.sharding.store.pvc.size: 1Gi is less than")
    warned = [e for e in result.events if e.reason == "StoreSpecNotApplied"]
    assert [e.type for e in warned] == ["Warning"]
    assert result.phase == "Ready"  # the store keeps its size; serving goes on
    assert [e.reason for e in cluster.step().events] == []  # posted once
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    assert cond(cluster.step(), "Validated")["reason"] == "Valid"


def test_store_resize_refused_by_the_api_server_is_reported() -> None:
    cluster = store_cluster("1Gi")
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    refusal = "only dynamically provisioned pvc can be resized"
    result = cluster.step(store_resize_refused=refusal)
    assert result.resize is None
    assert "ResizingStore" not in [e.reason for e in result.events]
    validated = cond(result, "Validated")
    assert validated["reason"] == "StoreSpecNotApplied"
    assert refusal in validated["message"]
    assert "allowVolumeExpansion: true" in validated["message"]
    assert "set size back to 1Gi" in validated["message"]
    assert ("Warning", "StoreSpecNotApplied") in [(e.type, e.reason) for e in result.events]
    # Every pass tries again (the class may allow it by now); refused the same way, there is
    # nothing new to say.
    assert plan(cluster.body, cluster.observed()).resize is not None
    assert cluster.step(store_resize_refused=refusal).events == []


def test_store_lowering_refused_by_an_older_api_server_is_reported() -> None:
    """Lowering a request that is still above the volume's capacity is how Kubernetes 1.34
    retries an expansion that cannot finish; an API server without it refuses the change."""
    cluster = store_cluster("1Gi")
    claim = cluster.objects[("PersistentVolumeClaim", "r1-shards")]
    claim["spec"]["resources"]["requests"]["storage"] = "100Gi"  # asked, never reached
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "20Gi"}}}})
    assert plan(cluster.body, cluster.observed()).resize is not None
    refusal = (
        "spec.resources.requests.storage: Forbidden: field can not be less than previous value"
    )
    result = cluster.step(store_resize_refused=refusal)
    message = cond(result, "Validated")["message"]
    assert refusal in message and message.endswith("set size back to 100Gi")
    assert "allowVolumeExpansion" not in message


def test_store_expansion_the_storage_backend_could_not_finish_is_reported() -> None:
    cluster = store_cluster("1Gi")
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    apply_resize(cluster, cluster.step())
    claim = cluster.objects[("PersistentVolumeClaim", "r1-shards")]
    claim["status"]["conditions"] = [{"type": "Resizing", "status": "True"}]
    assert cond(cluster.step(), "Validated")["reason"] == "Valid"  # still going: nothing to say
    claim["status"]["conditions"] = [
        {"type": "ControllerResizeError", "status": "True", "message": "quota exceeded"}
    ]
    result = cluster.step()
    validated = cond(result, "Validated")
    assert validated["reason"] == "StoreSpecNotApplied"
    assert (
        "did not grow from 1Gi to 2Gi (ControllerResizeError: quota exceeded)"
        in (validated["message"])
    )
    assert ("Warning", "StoreSpecNotApplied") in [(e.type, e.reason) for e in result.events]
    assert result.phase == "Ready"  # the shards fit the size they have
    del claim["status"]["conditions"]
    claim["status"]["allocatedResourceStatuses"] = {"storage": "NodeResizeInfeasible"}
    assert "(NodeResizeInfeasible)" in cond(cluster.step(), "Validated")["message"]
    claim["status"] = {"phase": "Bound", "capacity": {"storage": "2Gi"}}  # grown after all
    assert cond(cluster.step(), "Validated")["reason"] == "Valid"


def test_store_growth_waits_while_the_claim_is_unbound() -> None:
    body = copy.deepcopy(TWO_NODES)
    body["spec"]["sharding"]["store"] = {"pvc": {"storageClassName": "nfs", "size": "1Gi"}}
    cluster = FakeCluster(body)
    cluster.step()
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    result = cluster.step()
    assert result.resize is None
    assert cond(result, "Sharded")["reason"] == "StoreNotBound"
    assert "2Gi is applied once the claim is bound" in cond(result, "Sharded")["message"]
    cluster.objects[("PersistentVolumeClaim", "r1-shards")]["status"] = {
        "phase": "Bound",
        "capacity": {"storage": "1Gi"},
    }
    assert cluster.step().resize is not None


def test_store_warning_and_spec_warning_together() -> None:
    cluster = store_cluster("2Gi")
    cluster.change_spec(
        {
            "sharding": {"store": {"pvc": {"size": "1Gi"}}},
            "expertParallel": {"alltoallBufferScaleFactors": [[0, 8.0]]},
        }
    )
    warnings = {"SpecWarning", "StoreSpecNotApplied"}
    result = cluster.step()
    assert sorted(e.reason for e in result.events if e.reason in warnings) == sorted(warnings)
    message = cond(result, "Validated")["message"]
    assert "spec.sharding.store.pvc.size" in message and "has no effect with level 1" in message
    # The store fixed: the spec warning stays and is not posted again.
    cluster.change_spec({"sharding": {"store": {"pvc": {"size": "2Gi"}}}})
    result = cluster.step()
    assert cond(result, "Validated")["reason"] == "ValidWithWarnings"
    assert not [e for e in result.events if e.reason in warnings]
