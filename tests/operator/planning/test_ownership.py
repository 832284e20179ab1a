"""The operator never applies over, adopts or deletes an object it did not create (issue 16.1), and
two deployments never get the same child names (issue 16.2): the pure decisions."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
from fake_cluster import TWO_NODES, FakeCluster, cond, pod_status

from deepseek_operator.planning import Observed, names, ownership, plan
from deepseek_operator.planning.observed import meta

UID = "uid-r1"


def user_object(kind: str, name: str, **metadata: Any) -> dict[str, Any]:
    """What `kubectl create` leaves: no ownerReferences, kubectl's field manager."""
    return {
        "kind": kind,
        "metadata": {
            "name": name,
            "uid": f"user-{name}",
            "managedFields": [{"manager": "kubectl-create", "operation": "Update"}],
            **metadata,
        },
    }


def ours(kind: str, name: str, owner_uid: str = UID) -> dict[str, Any]:
    return user_object(
        kind,
        name,
        ownerReferences=[{"kind": "DeepSeekDeployment", "name": "r1", "uid": owner_uid}],
        managedFields=[{"manager": names.MANAGER, "operation": "Apply"}],
    )


# ----------------------------------------------------------------------------- ownership


def test_an_object_with_our_owner_reference_is_ours() -> None:
    assert ownership.foreign_reason(ours("Service", "r1"), UID, "r1") is None


def test_a_users_object_is_foreign() -> None:
    why = ownership.foreign_reason(user_object("Service", "r1"), UID, "r1")
    assert why == "it was not created by the operator for this deployment"


def test_another_deployments_child_is_foreign_even_with_our_field_manager() -> None:
    other = ours("Service", "r1", owner_uid="uid-other")
    other["metadata"]["ownerReferences"][0].update(controller=True, name="other")
    why = ownership.foreign_reason(other, UID, "r1")
    assert why == "it is controlled by DeepSeekDeployment other"


def test_a_users_object_owned_by_something_else_is_foreign() -> None:
    obj = user_object(
        "ConfigMap",
        "r1-engine",
        ownerReferences=[{"kind": "HelmRelease", "name": "x", "uid": "u9", "controller": False}],
    )
    assert ownership.foreign_reason(obj, UID, "r1") is not None


def test_an_orphan_we_wrote_for_this_name_is_adopted_one_for_another_name_is_not() -> None:
    orphan = ours("Service", "r1")
    del orphan["metadata"]["ownerReferences"]
    orphan["metadata"]["annotations"] = {names.DEPLOYMENT_ANNOTATION: "r1"}
    assert ownership.foreign_reason(orphan, UID, "r1") is None
    orphan["metadata"]["annotations"] = {names.DEPLOYMENT_ANNOTATION: "r2"}
    assert ownership.foreign_reason(orphan, UID, "r1") is not None
    # A user's object that copies our annotation, written by kubectl, is still theirs.
    copied = user_object("Service", "r1", annotations={names.DEPLOYMENT_ANNOTATION: "r1"})
    assert ownership.foreign_reason(copied, UID, "r1") is not None


def test_only_pods_controlled_by_our_jobs_and_statefulsets_are_ours() -> None:
    sts = {"metadata": {"name": "r1-worker", "uid": "sts-1"}}
    mine = {"metadata": {"name": "a", "ownerReferences": [{"uid": "sts-1", "controller": True}]}}
    labelled_only = {"metadata": {"name": "b"}}
    other = {"metadata": {"name": "c", "ownerReferences": [{"uid": "sts-9", "controller": True}]}}
    assert ownership.owned_pods([mine, labelled_only, other], [sts]) == [mine]


# ----------------------------------------------------------------------------- planning


def desired(observed: Observed | None = None) -> list[dict[str, Any]]:
    return plan(TWO_NODES, observed or Observed()).apply


def test_every_child_not_observed_as_ours_is_read_before_applying() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    observed = cluster.observed()
    apply = plan(cluster.body, observed).apply
    checked = {ownership.key(o) for o in ownership.to_check(apply, observed)}
    # The StatefulSet was listed (and owner-checked) already; the rest are read by name.
    assert checked == {
        "Service r1-ranks",
        "Service r1",
        "ConfigMap r1-engine",
        "ConfigMap r1-hccl",
        "PodDisruptionBudget r1-workers",
    }


def test_a_foreign_client_service_is_held_back_and_reported() -> None:
    foreign = {"Service r1": "it was not created by the operator for this deployment"}
    result = plan(TWO_NODES, Observed(foreign=foreign))
    applied = {ownership.key(o) for o in result.apply}
    assert "Service r1" not in applied
    assert {"Service r1-ranks"} <= applied and any(k.startswith("Job ") for k in applied)
    validated = cond(result, "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "ForeignObject")
    assert "Service r1 already exists" in validated["message"]
    assert "Rename or delete that object" in validated["message"]
    assert "metadata.name" in validated["message"]
    assert result.phase == "Failed"
    assert ("Warning", "ForeignObject") in [(e.type, e.reason) for e in result.events]
    # The same again: no new Event.
    body = copy.deepcopy(TWO_NODES)
    body["status"] = result.status.to_dict()
    again = plan(body, Observed(foreign=foreign))
    assert "ForeignObject" not in [e.reason for e in again.events]


@pytest.mark.parametrize("component", [names.HEADLESS, names.ENGINE_CONFIG, names.SHARD_STORE])
def test_a_foreign_shared_child_holds_the_jobs_and_workers_that_use_it(component: str) -> None:
    apply = [
        {
            "kind": kind,
            "metadata": {"name": f"x-{c}", "labels": {names.COMPONENT_LABEL: c}},
        }
        for kind, c in [
            ("Service", names.HEADLESS),
            ("Service", names.SERVICE),
            ("ConfigMap", names.ENGINE_CONFIG),
            ("PersistentVolumeClaim", names.SHARD_STORE),
            ("Job", names.SHARDER),
            ("StatefulSet", names.WORKER),
            ("PodDisruptionBudget", names.DISRUPTION),
        ]
    ]
    kind = next(o["kind"] for o in apply if o["metadata"]["name"] == f"x-{component}")
    kept = ownership.hold(apply, {f"{kind} x-{component}": "theirs"})
    kinds = [o["kind"] for o in kept]
    assert f"x-{component}" not in [meta(o)["name"] for o in kept]
    assert "Job" not in kinds and "StatefulSet" not in kinds
    assert "PodDisruptionBudget" in kinds


def test_a_planned_delete_names_the_uid_it_read() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    cluster.pods["r1-worker-1"]["status"].update(pod_status(ready=False, restarts=1))
    uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in cluster.pods.values()}
    result = cluster.step()
    assert result.delete and all(d.uid == uids[d.name] for d in result.delete)


# ----------------------------------------------------------------------------- names


def children(name: str) -> set[tuple[str, str]]:
    return {
        ("Service", names.client_service(name)),
        ("Service", names.headless_service(name)),
        ("ConfigMap", names.config_map(name)),
        ("PersistentVolumeClaim", names.store_claim(name)),
        ("StatefulSet", names.statefulset(name)),
        ("PodDisruptionBudget", names.disruption_budget(name)),
        ("Job", names.shard_job(name, "0123456789abcdef")),
    }


def test_a_literal_name_never_equals_another_deployments_rewritten_name() -> None:
    long = "deepseek-v3-serving-for-the-research-cluster-team"  # > 40: rewritten
    rewritten = names.base_name(long)
    assert rewritten != long
    # A deployment literally named like the other's rewritten name gets other children.
    assert names.base_name(rewritten) != rewritten
    assert not children(long) & children(rewritten)
    assert names.instance(long) != names.instance(rewritten)
    assert names.owned_selector(long) != names.owned_selector(rewritten)
    dotted = "deepseek-v3.1"
    assert names.base_name(names.base_name(dotted)) != names.base_name(dotted)


def test_plain_names_keep_their_children_and_date_like_names_are_rewritten() -> None:
    assert names.base_name("r1") == "r1" and names.instance("r1") == "r1"
    assert names.base_name("llm-20240101") != "llm-20240101"
    assert names.base_name("llm-2024010") == "llm-2024010"  # 7 digits: not the rewritten shape


def test_child_names_of_many_names_never_meet() -> None:
    stems = ["a", "r1", "llm-20240101", "x" * 45, "a.b", "a-b", "1a", "deepseek-v3.1"]
    candidates = set(stems) | {names.base_name(s) for s in stems}
    for a, b in itertools.combinations(sorted(candidates), 2):
        assert not children(a) & children(b), (a, b)
        assert names.instance(a) != names.instance(b), (a, b)
