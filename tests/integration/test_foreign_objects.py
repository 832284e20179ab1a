"""Issue 16.1 on a real control plane: a user's Service, ConfigMap and claim that carry a child's
name are never applied over, adopted or deleted, and survive deleting the deployment."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from test_operator import deployment

from conftest import Dsd, OperatorProcess, create_claim
from deepseek_operator.planning import names

pytestmark = pytest.mark.integration

USER_LABELS = {"app": "mine"}


def user_service(dsd: Dsd, name: str) -> Any:
    return dsd.core.create_namespaced_service(
        dsd.namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": USER_LABELS},
            "spec": {"selector": USER_LABELS, "ports": [{"name": "web", "port": 80}]},
        },
    )


def user_config_map(dsd: Dsd, name: str) -> Any:
    return dsd.core.create_namespaced_config_map(
        dsd.namespace,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "labels": USER_LABELS},
            "data": {"precious": "yes"},
        },
    )


def untouched(obj: Any, labels: dict[str, str] | None = USER_LABELS) -> None:
    """No ownerReference, our labels or field manager on a user's object."""
    md = obj.metadata
    assert not md.owner_references, md.owner_references
    assert md.labels == labels, md.labels
    assert names.MANAGER not in [m.manager for m in md.managed_fields or ()]


def test_a_users_objects_named_like_children_are_left_alone_and_survive_deletion(
    running_operator: OperatorProcess, dsd: Dsd
) -> None:
    ns = dsd.namespace
    # "own" shards into the namespace's claim; its API Service and engine ConfigMap are taken.
    service = user_service(dsd, names.client_service("own"))
    config_map = user_config_map(dsd, names.config_map("own"))
    # "keep" asks the operator for a store claim whose name is taken by the user's bound claim.
    create_claim(dsd.core, ns, names.store_claim("keep"), "manual")
    claim = dsd.core.read_namespaced_persistent_volume_claim(names.store_claim("keep"), ns)

    dsd.create(deployment("own"))
    store = {"pvc": {"storageClassName": "manual", "size": "1Gi"}}
    dsd.create(deployment("keep", sharding={"store": store}))

    def foreign(name: str, *objects: str) -> dict[str, Any] | None:
        validated = dsd.condition(name, "Validated")
        if validated.get("reason") != "ForeignObject":
            return None
        if not all(f"{o} already exists" in validated.get("message", "") for o in objects):
            return None
        return validated

    # The ConfigMap is applied only once the shards are complete: then it is found taken.
    own = dsd.wait(
        "own: ForeignObject for its Service and ConfigMap",
        lambda: foreign("own", "Service own", "ConfigMap own-engine"),
        timeout=120,
    )
    assert own["status"] == "False" and "Rename or delete" in own["message"]
    keep = dsd.wait(
        "keep: ForeignObject for its claim",
        lambda: foreign("keep", "PersistentVolumeClaim keep-shards"),
        timeout=60,
    )
    assert keep["status"] == "False"
    assert dsd.status("own")["phase"] == "Failed" and dsd.status("keep")["phase"] == "Failed"
    assert "ForeignObject" in dsd.event_reasons("own")
    # Children that depend on a foreign one are held: no sharder writes into the user's claim,
    # no workers read the user's ConfigMap.
    assert not [j for j in dsd.jobs() if j.metadata.name.startswith("keep-")]
    assert not dsd.apps.list_namespaced_stateful_set(ns).items
    # The other children are there, ours.
    ours = dsd.core.read_namespaced_service(names.headless_service("own"), ns)
    assert ours.metadata.owner_references

    now = dsd.core.read_namespaced_service(service.metadata.name, ns)
    untouched(now)
    assert now.spec.selector == USER_LABELS
    untouched(dsd.core.read_namespaced_config_map(config_map.metadata.name, ns))
    untouched(dsd.core.read_namespaced_persistent_volume_claim(claim.metadata.name, ns), None)

    # Deleting the deployments garbage-collects their children, and none of the user's objects.
    dsd.delete("own")
    dsd.delete("keep")

    def collected() -> bool:
        try:
            dsd.core.read_namespaced_service(names.headless_service("own"), ns)
        except client.ApiException as exc:
            return exc.status == 404
        return False

    dsd.wait("own's rank-discovery Service garbage-collected", collected, timeout=90)
    dsd.wait(
        "keep's rank-discovery Service garbage-collected",
        lambda: (
            not dsd.core.list_namespaced_service(
                ns, field_selector=f"metadata.name={names.headless_service('keep')}"
            ).items
        ),
        timeout=90,
    )
    after = dsd.core.read_namespaced_service(service.metadata.name, ns)
    assert after.metadata.uid == service.metadata.uid and after.spec.selector == USER_LABELS
    cm = dsd.core.read_namespaced_config_map(config_map.metadata.name, ns)
    assert cm.metadata.uid == config_map.metadata.uid and cm.data == {"precious": "yes"}
    pvc = dsd.core.read_namespaced_persistent_volume_claim(claim.metadata.name, ns)
    assert pvc.metadata.uid == claim.metadata.uid and pvc.metadata.deletion_timestamp is None
