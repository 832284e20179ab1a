"""The shard store claim the operator created, against spec.sharding.store.pvc now: a larger size
grows it (once Bound), a smaller one or another class is refused with the field and the fix, and a
resize the API server refuses or the storage cannot finish is reported."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..api.quantity import compare_quantities
from . import objects
from .observed import terminating
from .state import PassState
from .status import EventSpec


@dataclass(frozen=True)
class StoreChange:
    """What to do about an existing store claim whose spec.sharding.store.pvc may have changed."""

    current: str = ""  # the claim's storage request now
    request: str | None = None  # the storage request to apply; None leaves the claim alone
    event: str = ""  # the Normal Event posted when the request is changed
    waiting: str = ""  # why a larger size waits (joins the StoreNotBound message)
    warning: str = ""  # what of the spec the claim does not get, and the fix


def store_change(
    name: str, size: str, storage_class: str | None, claim: Mapping[str, Any]
) -> StoreChange:
    """Compare spec.sharding.store.pvc with the claim the operator created from it.

    Kubernetes lets a claim's request grow once the claim is Bound (the storage class must allow
    volume expansion: the API server checks that), never shrink below what the volume already
    has, and never change class. A larger size is applied when the claim is Bound, and waits while
    it is not; a smaller one only undoes an expansion the volume has not reached yet (a request
    still above status.capacity), else it is refused with a warning; quantities are compared by
    value ("2048Mi" is "2Gi").
    """
    spec = claim.get("spec") or {}
    status = claim.get("status") or {}
    requested = str(((spec.get("resources") or {}).get("requests") or {}).get("storage") or "")
    capacity = str((status.get("capacity") or {}).get("storage") or "")
    bound = status.get("phase") == "Bound"
    warnings: list[str] = []
    have_class = spec.get("storageClassName")
    if storage_class is not None and have_class is not None and storage_class != have_class:
        warnings.append(
            f"spec.sharding.store.pvc.storageClassName: PersistentVolumeClaim {name} was created "
            f"with storage class {have_class} and a claim's class cannot change, so the shards "
            f"stay there: set storageClassName back to {have_class}"
        )
    order = compare_quantities(size, requested)
    if not order:  # equal, or a request that is not a quantity (nothing sensible to do)
        failure = expansion_failure(status)
        if failure and capacity and compare_quantities(requested, capacity) == 1:
            warnings.insert(
                0,
                f"spec.sharding.store.pvc.size: the volume of PersistentVolumeClaim {name} did "
                f"not grow from {capacity} to {requested} ({failure}): fix what the storage "
                f"backend reports (the claim's Events say more), or lower size to a value above "
                f"{capacity} to retry the expansion at that size",
            )
        return StoreChange(current=requested, warning="; ".join(warnings))
    if order > 0 and not bound:
        return StoreChange(
            current=requested,
            waiting=f"spec.sharding.store.pvc.size {size} is applied once the claim is bound "
            f"(it asks for {requested}; an unbound claim cannot change)",
            warning="; ".join(warnings),
        )
    if order > 0:
        return StoreChange(
            current=requested,
            request=size,
            event=f"raising the storage request of PersistentVolumeClaim {name} from {requested} "
            f"to {size} (spec.sharding.store.pvc.size)",
            warning="; ".join(warnings),
        )
    if bound and compare_quantities(size, capacity) == 1:
        return StoreChange(
            current=requested,
            request=size,
            event=f"lowering the storage request of PersistentVolumeClaim {name} from "
            f"{requested} to {size}, still above its capacity {capacity}: the expansion the "
            "volume has not reached yet is retried at the smaller size",
            warning="; ".join(warnings),
        )
    fix = f"set size to {requested} or more"
    if capacity and compare_quantities(capacity, requested) == -1:
        fix += f" (or to more than its capacity {capacity}, to retry an unfinished expansion)"
    warnings.insert(
        0,
        f"spec.sharding.store.pvc.size: {size} is less than the {requested} that "
        f"PersistentVolumeClaim {name} asks for, and a claim never shrinks, so it keeps "
        f"{requested}: {fix}",
    )
    return StoreChange(current=requested, warning="; ".join(warnings))


# A claim's expansion that stopped: the resizer's error conditions, or a size it cannot reach.
RESIZE_ERRORS = ("ControllerResizeError", "NodeResizeError")
RESIZE_INFEASIBLE = ("ControllerResizeInfeasible", "NodeResizeInfeasible")


def expansion_failure(status: Mapping[str, Any]) -> str:
    """Why a claim's volume expansion stopped, from its status; "" while none did."""
    for c in status.get("conditions") or ():
        if c.get("type") in RESIZE_ERRORS and c.get("status") == "True":
            return f"{c['type']}: {c.get('message') or 'no message'}"
    state = str((status.get("allocatedResourceStatuses") or {}).get("storage") or "")
    return state if state in RESIZE_INFEASIBLE else ""


def plan_store(state: PassState) -> StoreChange | None:
    """The store claim the operator created, against spec.sharding.store.pvc now: plans a
    new storage request, or says what the claim does not get."""
    ctx, store = state.ctx, state.spec.sharding.store
    claim = objects.store_claim(ctx) if state.spec.sharding.enabled else None
    if claim is None or store is None or store.pvc is None or store.pvc.size is None:
        return None
    name = claim["metadata"]["name"]
    observed = state.observed.claim(name)
    if observed is None or terminating(observed):
        return None
    change = store_change(name, store.pvc.size, store.pvc.storage_class_name, observed)
    if change.request is None:
        return change
    refused = state.observed.store_resize_refused
    if refused:
        fix = f"set size back to {change.current}"
        if compare_quantities(change.request, change.current) == 1:
            storage_class = (observed.get("spec") or {}).get("storageClassName")
            fix = (
                f"let storage class {storage_class} expand volumes (allowVolumeExpansion: "
                f"true), or {fix}"
            )
        warning = (
            f"spec.sharding.store.pvc.size: the API server refused to change the storage "
            f"request of PersistentVolumeClaim {name} from {change.current} to "
            f"{change.request} ({refused}): {fix}"
        )
        return StoreChange(
            current=change.current,
            warning="; ".join(w for w in (warning, change.warning) if w),
        )
    state.resize = objects.resized_store_claim(ctx, observed, change.request)
    state.events.append(EventSpec("Normal", "ResizingStore", change.event))
    return change
