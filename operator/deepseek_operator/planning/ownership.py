"""Whether an object found under a child's name belongs to this deployment.

The operator applies over, adopts or deletes only what it created: a user's Service, ConfigMap or
claim that happens to carry a child's name (or another deployment's child) is left as it is, the
children that depend on it are held back, and the deployment reports a ForeignObject condition
naming the object and the fix. Pure: the shell reads the objects, this module decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import names
from .observed import Obj, Observed, annotation, meta, uid

# Children that others refer to by name: while one of them is foreign, the Jobs and the
# StatefulSet that would mount or resolve it are not applied either (a sharder must never write
# into someone else's claim, a worker never read someone else's engine config).
SHARED_COMPONENTS = frozenset({names.SHARD_STORE, names.ENGINE_CONFIG, names.HEADLESS})
DEPENDENT_KINDS = frozenset({"Job", "StatefulSet"})


def key(obj: Mapping[str, Any]) -> str:
    """ "Kind name", as conditions and the shell's maps name a child."""
    return f"{obj.get('kind')} {meta(obj).get('name')}"


def managed_by_us(obj: Mapping[str, Any]) -> bool:
    """Whether the operator's field manager has written to the object."""
    return any(m.get("manager") == names.MANAGER for m in meta(obj).get("managedFields") or ())


def foreign_reason(obj: Mapping[str, Any], owner_uid: str, deployment: str) -> str | None:
    """None when the existing object is this deployment's (its ownerReference names our uid, or
    it is an orphan our field manager wrote for a deployment of this name, as
    `kubectl delete --cascade=orphan` leaves them); else who it belongs to."""
    refs = meta(obj).get("ownerReferences") or ()
    if owner_uid and any(r.get("uid") == owner_uid for r in refs):
        return None
    controller = next((r for r in refs if r.get("controller")), None)
    if controller is not None:
        return f"it is controlled by {controller.get('kind')} {controller.get('name')}"
    if (
        not refs
        and managed_by_us(obj)
        and annotation(obj, names.DEPLOYMENT_ANNOTATION) == deployment
    ):
        return None
    return "it was not created by the operator for this deployment"


def to_check(apply: Iterable[Obj], observed: Observed) -> list[Obj]:
    """The desired objects whose namesake must be read before applying: all but those already
    observed as ours (the shell lists Jobs, StatefulSets and claims filtered by owner)."""
    lookups = {
        "Job": observed.job,
        "StatefulSet": observed.statefulset,
        "PersistentVolumeClaim": observed.claim,
    }
    out = []
    for obj in apply:
        lookup = lookups.get(str(obj.get("kind")))
        if lookup is None or lookup(str(meta(obj).get("name"))) is None:
            out.append(obj)
    return out


def hold(apply: Iterable[Obj], foreign: Mapping[str, str]) -> list[Obj]:
    """The objects that may be applied: never a foreign namesake, and no Job or StatefulSet while
    a child they refer to is foreign."""
    apply = list(apply)
    if not foreign:
        return apply
    shared = any(
        key(o) in foreign
        and (meta(o).get("labels") or {}).get(names.COMPONENT_LABEL) in SHARED_COMPONENTS
        for o in apply
    )
    return [
        o
        for o in apply
        if key(o) not in foreign and not (shared and o.get("kind") in DEPENDENT_KINDS)
    ]


def foreign_message(foreign: Mapping[str, str], deployment: str) -> str:
    """The condition message: each object, whose it is, and the ways out."""
    found = "; ".join(f"{child} already exists and {why}" for child, why in sorted(foreign.items()))
    return (
        f"{found}: the operator never applies over, adopts or deletes an object it did not "
        f"create, so it holds that child (and the Jobs and workers that depend on it). Rename or "
        f"delete that object, or give this DeepSeekDeployment another metadata.name (every child "
        f"name derives from it: {deployment!r} -> {names.base_name(deployment)!r})"
    )


def owned_pods(pods: Iterable[Obj], owners: Iterable[Mapping[str, Any]]) -> list[Obj]:
    """The pods whose controller is one of `owners` (this deployment's Jobs and StatefulSets):
    pods that only carry the same labels are someone else's."""
    uids = {uid(o) for o in owners if uid(o)}
    return [
        p
        for p in pods
        if any(
            r.get("controller") and r.get("uid") in uids
            for r in meta(p).get("ownerReferences") or ()
        )
    ]
