"""Kubernetes quantities compared by value, and what the planner does when spec.sharding.store.pvc
no longer matches the claim it created (grow, wait, refuse)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest

from deepseek_operator.api.quantity import compare_quantities, parse_quantity
from deepseek_operator.planning.plan import store_change

GI = 1024**3


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10Gi", 10 * GI),
        ("10737418240", 10 * GI),
        ("1Ti", 1024 * GI),
        ("1.5Gi", 3 * GI // 2),
        ("2048Mi", 2 * GI),
        ("500M", 500 * 10**6),
        ("1e12", 10**12),
        ("1E3", 1000),
        ("1E", 10**18),  # exa, not an exponent
        ("100m", Fraction(1, 10)),
        ("+.5k", 500),
        ("0", 0),
        (" 1Ki ", 1024),
        (1024, 1024),
    ],
)
def test_parse_quantity(text: str | int, value: int | Fraction) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "1GiB", "1 Gi", "1gi", "1e1.5", "1.2.3", "abc", None])
def test_not_a_quantity(text: str | None) -> None:
    assert parse_quantity(text) is None


def test_compare_quantities_by_value_not_by_text() -> None:
    assert compare_quantities("10Gi", "10737418240") == 0
    assert compare_quantities("2048Mi", "2Gi") == 0
    assert compare_quantities("1Ti", "10Gi") == 1
    assert compare_quantities("10G", "10Gi") == -1  # decimal giga is less than gibi
    assert compare_quantities("1x", "1Gi") is None


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
