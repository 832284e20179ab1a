"""What the planner does when spec.sharding.store.pvc no longer matches the claim it created
(grow, wait, refuse), quantities compared by value."""

from __future__ import annotations

from typing import Any

from deepseek_operator.planning.store import store_change


def claim(request: str, phase: str = "Bound", capacity: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if phase == "Bound":
        status["capacity"] = {"storage": capacity or request}
    return {
        "metadata": {"name": "r1-shards"},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "nfs",
            "resources": {"requests": {"storage": request}},
        },
        "status": status,
    }


def test_same_size_in_other_units_changes_nothing() -> None:
    change = store_change("r1-shards", "10737418240", "nfs", claim("10Gi"))
    assert (change.request, change.warning, change.waiting, change.current) == (
        None,
        "",
        "",
        "10Gi",
    )


def test_a_larger_size_grows_a_bound_claim() -> None:
    change = store_change("r1-shards", "1Ti", "nfs", claim("10Gi"))
    assert change.request == "1Ti" and not change.warning
    assert "from 10Gi to 1Ti" in change.event and "spec.sharding.store.pvc.size" in change.event


def test_a_larger_size_waits_for_the_claim_to_bind() -> None:
    change = store_change("r1-shards", "20Gi", "nfs", claim("10Gi", phase="Pending"))
    assert change.request is None and not change.warning
    assert "20Gi is applied once the claim is bound" in change.waiting


def test_a_smaller_size_is_refused_with_the_field_and_the_fix() -> None:
    change = store_change("r1-shards", "5Gi", "nfs", claim("10Gi"))
    assert change.request is None
    assert change.warning.startswith("spec.sharding.store.pvc.size: 5Gi is less than the 10Gi")
    assert "set size to 10Gi or more" in change.warning
    unbound = store_change("r1-shards", "5Gi", "nfs", claim("10Gi", phase="Pending"))
    assert unbound.request is None and "never shrinks" in unbound.warning


def test_a_smaller_size_above_the_capacity_retries_an_unfinished_expansion() -> None:
    # The volume has 10Gi, the claim asks 100Gi (the storage could not grow that far).
    stuck = claim("100Gi", capacity="10Gi")
    change = store_change("r1-shards", "20Gi", "nfs", stuck)
    assert change.request == "20Gi" and "still above its capacity 10Gi" in change.event
    refused = store_change("r1-shards", "10Gi", "nfs", stuck)  # not above the capacity
    assert refused.request is None
    assert "or to more than its capacity 10Gi" in refused.warning


def test_another_storage_class_is_refused() -> None:
    change = store_change("r1-shards", "10Gi", "fast", claim("10Gi"))
    assert change.request is None
    assert change.warning.startswith("spec.sharding.store.pvc.storageClassName:")
    assert "set storageClassName back to nfs" in change.warning
    both = store_change("r1-shards", "20Gi", "fast", claim("10Gi"))
    assert both.request == "20Gi" and "storageClassName" in both.warning
